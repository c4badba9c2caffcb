"""
Pricing from the model catalog: every current model, cache writes 5m/1h and reads per
model, Haiku 5.5's long-prompt tier per request, the inference_geo surcharge, the batch
discount, config overrides, and no guessing for a model nobody prices.
"""

from __future__ import annotations

import typing

import pytest
from anthropic.types.model import Model

from batchd.daemon.models.catalog import default_catalog
from batchd.daemon.models.pricing import (
    PriceTable,
    batch_cost,
    estimate_request_tokens,
    estimate_tokens,
    projected_cost,
)
from batchd.plugins.errors import ConfigError

MTOK = 1_000_000
SDK_MODELS = [m for m in typing.get_args(typing.get_args(Model)[0])]


class TestCatalogPrices:
    def test_every_model_the_sdk_lists_is_priced(self) -> None:
        """Every id of the installed SDK's Model type has a price, but Mythos Preview (none
        published, past its end of life): nothing is costed at a made-up fallback any more.
        The list follows the SDK: 2.14 has 22 ids, 2.15 dropped Sonnet 4.5's two (retired
        2026-11-30), and a newer SDK may add ids the catalog must then learn."""
        assert "claude-haiku-5-5" in SDK_MODELS and len(SDK_MODELS) >= 20
        table = PriceTable()
        unpriced = [m for m in SDK_MODELS if not table.known(m)]
        assert unpriced == ["claude-mythos-preview"]

    @pytest.mark.parametrize(
        ("model", "prices"),
        [
            ("claude-haiku-5-5", (0.10, 0.50, 0.125, 0.20, 0.01)),
            ("claude-sonnet-5-5", (2.0, 10.0, 2.50, 4.0, 0.10)),
            ("claude-opus-5-5", (4.0, 20.0, 5.0, 8.0, 0.20)),
            ("claude-fable-5-1", (10.0, 50.0, 12.50, 20.0, 0.25)),
            ("claude-fable-5", (10.0, 50.0, 12.50, 20.0, 1.0)),
            ("claude-opus-4-8", (5.0, 25.0, 6.25, 10.0, 0.50)),
            ("claude-sonnet-4-6", (3.0, 15.0, 3.75, 6.0, 0.30)),
            ("claude-haiku-4-5", (1.0, 5.0, 1.25, 2.0, 0.10)),
            ("claude-opus-4-5", (5.0, 25.0, 6.25, 10.0, 0.50)),
        ],
    )
    def test_list_prices_as_the_facts_give_them(
        self, model: str, prices: tuple[float, ...]
    ) -> None:
        """input / output / 5m write / 1h write / read per model (cache-read factors differ)."""
        pricing = PriceTable().pricing(model)
        assert pricing is not None
        base = pricing.base
        assert (base.input, base.output, base.cache_write_5m, base.cache_write_1h,
                base.cache_read) == pytest.approx(prices)

    @pytest.mark.parametrize("model", ["claude-haiku-4-5-20251001", "claude-haiku-4-5@20251001",
                                       "claude-opus-5-5-latest"])
    def test_dated_and_vertex_ids_resolve(self, model: str) -> None:
        assert PriceTable().known(model)

    @pytest.mark.parametrize("model", ["gpt-4o", "claude-sonnet-4-5x", "claude-next-7"])
    def test_unknown_model_has_no_price(self, model: str) -> None:
        """Not guessed: the cost is None (counted as unpriced by the collector)."""
        table = PriceTable()
        assert table.pricing(model) is None
        assert table.batch_cost(model, {"input_tokens": 10, "output_tokens": 1}) is None
        assert table.projected_cost(model, 10, 10) is None

    def test_unknown_model_reported_once(self) -> None:
        table = PriceTable()
        assert [table.report_unknown("claude-9") for _ in range(3)] == [True, False, False]
        assert table.report_unknown("claude-haiku-4-5-20251001") is False


class TestBatchCost:
    def test_half_of_list_price(self) -> None:
        usage = {"input_tokens": MTOK, "output_tokens": MTOK}
        assert batch_cost("claude-haiku-4-5-20251001", usage) == pytest.approx(3.0)

    def test_cache_writes_and_reads_per_model(self) -> None:
        """5m and 1h writes and reads at the model's own prices, halved."""
        usage = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 3 * MTOK,
                 "cache_creation": {"ephemeral_5m_input_tokens": MTOK,
                                    "ephemeral_1h_input_tokens": 2 * MTOK},
                 "cache_read_input_tokens": MTOK}
        # Opus 5.5: 5.0 + 2 * 8.0 + 0.20 (a 5% read), halved
        assert batch_cost("claude-opus-5-5", usage) == pytest.approx((5.0 + 16.0 + 0.20) / 2)

    def test_writes_without_a_split_are_five_minute_writes(self) -> None:
        usage = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": MTOK}
        assert batch_cost("claude-sonnet-4-6", usage) == pytest.approx(3.75 / 2)

    def test_haiku_5_5_long_prompt_tier_per_request(self) -> None:
        """Past 100,000 prompt tokens (cache writes and reads included) every category
        of *that* request is billed at the long tier; shorter requests stay at the base."""
        short = {"input_tokens": 60_000, "output_tokens": 1_000, "cache_read_input_tokens": 40_000}
        long = {"input_tokens": 60_001, "output_tokens": 1_000, "cache_read_input_tokens": 40_000}
        assert batch_cost("claude-haiku-5-5", short) == pytest.approx(
            (60_000 * 0.10 + 1_000 * 0.50 + 40_000 * 0.01) / MTOK / 2)
        assert batch_cost("claude-haiku-5-5", long) == pytest.approx(
            (60_001 * 0.50 + 1_000 * 2.50 + 40_000 * 0.05) / MTOK / 2)

    def test_inference_geo_us_adds_ten_percent(self) -> None:
        """From usage.inference_geo, or the request's setting when usage has none."""
        table = PriceTable()
        usage = {"input_tokens": MTOK, "output_tokens": 0}
        base = table.batch_cost("claude-sonnet-5-5", usage)
        assert base == pytest.approx(1.0)
        assert table.batch_cost("claude-sonnet-5-5", {**usage, "inference_geo": "us"}) == (
            pytest.approx(1.1))
        assert table.batch_cost("claude-sonnet-5-5", usage, geo="us") == pytest.approx(1.1)
        assert table.batch_cost("claude-sonnet-5-5", {**usage, "inference_geo": "global"},
                                geo="us") == pytest.approx(1.0)

    def test_thinking_is_output(self) -> None:
        """output_tokens already includes thinking: the split is not billed twice."""
        usage = {"input_tokens": 0, "output_tokens": 1000,
                 "output_tokens_details": {"thinking_tokens": 900}}
        assert batch_cost("claude-haiku-5-5", usage) == pytest.approx(1000 * 0.50 / MTOK / 2)

    def test_real_usage_block(self) -> None:
        usage = {"input_tokens": 1200, "output_tokens": 350, "cache_creation_input_tokens": None,
                 "cache_read_input_tokens": None, "server_tool_use": None,
                 "service_tier": "batch"}
        expected = (1200 * 3.0 + 350 * 15.0) / MTOK / 2
        assert batch_cost("claude-sonnet-4-6", usage) == pytest.approx(expected)

    @pytest.mark.parametrize("bad", [-1, "12", True])
    def test_bad_count_is_named(self, bad: object) -> None:
        with pytest.raises(ValueError, match=r"usage\.output_tokens"):
            batch_cost("claude-haiku-4-5", {"input_tokens": 1, "output_tokens": bad})


class TestCostFunction:
    USAGES = (
        {"input_tokens": 31, "output_tokens": 2},
        {"input_tokens": 31, "output_tokens": 3},
        {"input_tokens": 31, "output_tokens": 2, "cache_read_input_tokens": 9000},
        {"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 800,
         "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 500}},
        {"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 800,
         "cache_creation": {"ephemeral_5m_input_tokens": 800, "ephemeral_1h_input_tokens": 0}},
        {"input_tokens": 5, "output_tokens": 1, "inference_geo": "us"},
        {"input_tokens": 150_000, "output_tokens": 1},
    )  # fmt: skip

    def test_same_as_batch_cost_on_every_call(self) -> None:
        table = PriceTable()
        cost = table.cost_function(lambda model: None)
        for _ in range(3):
            for model in ("claude-haiku-5-5", "claude-sonnet-4-6", "claude-next-7"):
                for usage in self.USAGES:
                    assert cost(model, usage) == table.batch_cost(model, usage), (model, usage)

    def test_unknown_model_reported_once(self) -> None:
        seen: list[str] = []
        cost = PriceTable().cost_function(seen.append)
        for usage in self.USAGES * 2:
            assert cost("claude-9", usage) is None
            cost("claude-haiku-4-5", usage)
        assert seen == ["claude-9"]

    def test_bad_counts_still_rejected(self) -> None:
        cost = PriceTable().cost_function(lambda model: None)
        cost("claude-haiku-4-5", {"input_tokens": 1, "output_tokens": 1})
        for bad in ({"input_tokens": -1}, {"input_tokens": "many"},
                    {"input_tokens": 1, "cache_creation": [1]}):
            with pytest.raises(ValueError, match="usage"):
                cost("claude-haiku-4-5", bad)


class TestOverrides:
    def test_partial_override_of_a_catalog_model(self) -> None:
        pricing = PriceTable({"claude-haiku-4-5": {"output": 4.0}}).pricing("claude-haiku-4-5")
        assert pricing is not None
        assert (pricing.base.input, pricing.base.output, pricing.base.cache_write_5m) == (
            1.0, 4.0, 1.25)

    def test_input_override_moves_cache_prices_by_the_models_own_ratios(self) -> None:
        """Opus 5.5 reads at 5% of input: a new input price keeps that ratio."""
        pricing = PriceTable({"claude-opus-5-5": {"input": 8.0}}).pricing("claude-opus-5-5")
        assert pricing is not None
        assert (pricing.base.cache_write_5m, pricing.base.cache_write_1h,
                pricing.base.cache_read) == pytest.approx((10.0, 16.0, 0.40))

    @pytest.mark.parametrize("key", ["claude-haiku-4-5", "claude-haiku-4-5-20251001"])
    @pytest.mark.parametrize("answered", ["claude-haiku-4-5", "claude-haiku-4-5-20251001"])
    def test_override_by_alias_or_dated_id_prices_both(self, key: str, answered: str) -> None:
        """Whether answers echo the alias or the dated id is unverified: an override under
        either name prices both (it was ignored for alias answers under the dated id)."""
        pricing = PriceTable({key: {"input": 2.0, "output": 10.0}}).pricing(answered)
        assert pricing is not None and (pricing.base.input, pricing.base.output) == (2.0, 10.0)

    def test_legacy_cache_write_key_is_the_five_minute_write(self) -> None:
        pricing = PriceTable({"claude-haiku-4-5": {"cache_write": 9.0}}).pricing(
            "claude-haiku-4-5")
        assert pricing is not None and pricing.base.cache_write_5m == 9.0

    def test_new_model_becomes_priced(self) -> None:
        table = PriceTable({"claude-future-5": {"input": 2, "output": 10, "cache_read": 0.1}})
        pricing = table.pricing("claude-future-5-20270101")
        assert pricing is not None
        assert (pricing.base.input, pricing.base.output, pricing.base.cache_write_5m,
                pricing.base.cache_write_1h, pricing.base.cache_read) == (2.0, 10.0, 2.5, 4.0, 0.1)
        assert table.batch_cost("claude-future-5", {"input_tokens": MTOK}) == pytest.approx(1.0)

    def test_new_model_needs_input_and_output(self) -> None:
        with pytest.raises(ConfigError, match=r'batchd\.toml: \[prices\."claude-x"\].*input'):
            PriceTable({"claude-x": {"output": 5}}, source="/etc/batchd/batchd.toml")

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"inptu": 1.0}, "unknown key 'inptu'"),
            ({"input": -1}, "input must be a non-negative number"),
            ({"output": "15"}, "output must be a non-negative number"),
            ({"output": float("inf")}, "output must be finite"),
            (3.0, "must be a table"),
        ],
    )
    def test_bad_override_is_a_config_error(self, fields: object, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            PriceTable({"claude-haiku-4-5": fields})  # type: ignore[dict-item]

    def test_dearest_is_for_budgets_only(self) -> None:
        """The budget's bound for a per-record model: the dearest category prices known."""
        top = PriceTable({"claude-x": {"input": 1, "output": 500}}).dearest()
        assert top.output == 500.0
        assert top.input == max(m.price.input for m in default_catalog() if m.price)


class TestEstimates:
    @pytest.mark.parametrize(("text", "tokens"), [("", 0), ("abcd", 1), ("abcde", 2)])
    def test_four_characters_per_token_rounded_up(self, text: str, tokens: int) -> None:
        assert estimate_tokens(text) == tokens

    def test_request_text_is_counted(self) -> None:
        params = {
            "model": "claude-haiku-4-5",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "x" * 40}],
            "messages": [
                {"role": "user", "content": "y" * 8},
                {"role": "user", "content": [{"type": "text", "text": "z" * 4}, {"type": "image"}]},
            ],
        }
        assert estimate_request_tokens(params) == 10 + 2 + 1

    def test_projected_cost_bounds(self) -> None:
        assert projected_cost("claude-sonnet-4-6", input_tokens=MTOK, max_tokens=MTOK) == (
            pytest.approx(1.5), pytest.approx(9.0))

    def test_projected_cost_with_a_cached_prefix(self) -> None:
        """Low reads the cached part; high writes it (1h: 2x input) and fills max_tokens."""
        bounds = PriceTable().projected_cost("claude-haiku-4-5", MTOK, MTOK,
                                             cached_tokens=MTOK // 2, cache_ttl="1h")
        assert bounds == (pytest.approx((0.5 + 0.05) / 2), pytest.approx((0.5 + 1.0 + 5.0) / 2))

    def test_projected_cost_rejects_negative(self) -> None:
        with pytest.raises(ValueError, match="max_tokens=-1"):
            projected_cost("claude-haiku-4-5", 10, -1)
