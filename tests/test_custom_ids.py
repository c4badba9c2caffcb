"""
Properties of the key → custom_id mapping: always a valid, unique,
deterministic id, and a key that is already a valid id stays readable.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from batchd.daemon.intake.custom_ids import CustomIdAllocator, hashed_custom_id, is_valid_custom_id

PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # used with fullmatch: "$" accepts a final "\n"

valid_keys = st.from_regex(PATTERN, fullmatch=True)
any_text = st.text(max_size=200)
long_text = st.text(alphabet="ab-_/ é", min_size=60, max_size=400)
keys = st.one_of(
    valid_keys, any_text, long_text, st.sampled_from(["", " ", "\x00", "\n", "k-", "\udc80"])
)


def allocate_all(sequence: list[str]) -> list[str]:
    allocator = CustomIdAllocator()
    return [allocator.allocate(key) for key in sequence]


class TestCustomIdAllocator:
    @given(st.lists(keys, unique=True, max_size=60))
    def test_every_id_is_valid_and_unique(self, sequence: list[str]) -> None:
        """Any distinct keys get ids matching the API pattern, none repeated in the chunk."""
        ids = allocate_all(sequence)
        assert all(PATTERN.fullmatch(i) for i in ids)
        assert len(set(ids)) == len(ids)

    @given(st.lists(keys, unique=True, max_size=60))
    def test_deterministic_for_the_same_sequence(self, sequence: list[str]) -> None:
        """A chunk rebuilt after a crash reads the same keys and gets the same ids."""
        assert allocate_all(sequence) == allocate_all(list(sequence))

    @given(st.lists(keys, unique=True, max_size=60))
    def test_valid_key_is_used_as_is_unless_taken(self, sequence: list[str]) -> None:
        """A key that is a valid id keeps it, unless an earlier key already has that id."""
        allocator = CustomIdAllocator()
        used: set[str] = set()
        for key in sequence:
            custom_id = allocator.allocate(key)
            if is_valid_custom_id(key) and key not in used:
                assert custom_id == key
            else:
                assert custom_id != key or not is_valid_custom_id(key)
                assert custom_id.startswith("k-")
            used.add(custom_id)

    def test_collision_with_an_earlier_hash_is_salted(self) -> None:
        """A valid key equal to an earlier key's hash gets a different, still valid id."""
        odd = "ticket #1 (ünïcode)"
        ids = allocate_all([odd, hashed_custom_id(odd)])
        assert ids[0] == hashed_custom_id(odd)
        assert ids[1] != ids[0] and PATTERN.fullmatch(ids[1])

    def test_hash_clash_falls_back_to_salted_hashes(self) -> None:
        """When the hash itself is taken, successive salts are tried until one is free."""
        allocator = CustomIdAllocator()
        odd = "a b"
        taken = [hashed_custom_id(odd), hashed_custom_id(odd, 1)]
        for custom_id in taken:
            allocator.allocate(custom_id)
        assert allocator.allocate(odd) == hashed_custom_id(odd, 2)
        assert len(allocator) == 3

    @given(keys, valid_keys)
    def test_valid_preferred_id_wins(self, key: str, preferred: str) -> None:
        """The pipeline's custom_id template result is used when it is valid and free."""
        assert CustomIdAllocator().allocate(key, preferred) == preferred

    @given(keys, st.text(max_size=80).filter(lambda s: not PATTERN.fullmatch(s)))
    def test_invalid_preferred_id_is_hashed_from_the_key(self, key: str, preferred: str) -> None:
        """A template that renders an invalid id falls back to the key's hash."""
        assert CustomIdAllocator().allocate(key, preferred) == hashed_custom_id(key)

    def test_trailing_newline_is_not_valid(self) -> None:
        """``"T1\\n"`` is not a valid id (a regex ``$`` would accept it and the API reject it)."""
        assert not is_valid_custom_id("T1\n")
        assert allocate_all(["T1\n", "T1"]) == [hashed_custom_id("T1\n"), "T1"]

    def test_long_and_empty_keys(self) -> None:
        """A 65-character key and an empty key are hashed; a 64-character one is not."""
        assert allocate_all(["x" * 64]) == ["x" * 64]
        assert allocate_all(["x" * 65]) == [hashed_custom_id("x" * 65)]
        assert allocate_all([""]) == [hashed_custom_id("")]
        assert len(hashed_custom_id("y" * 10_000)) == 34
