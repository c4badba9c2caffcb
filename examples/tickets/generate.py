"""
Writes a CSV of realistic support tickets (ticket_id, body) for the demo and
the benchmarks, streaming, so a million rows cost no memory.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

SUBJECTS = {
    "billing": [
        "I was charged twice for my subscription this month",
        "Where can I download the invoice for March?",
        "Please refund the annual plan, I cancelled within the trial",
        "My credit card was declined but the payment went through",
    ],
    "bug": [
        "The export button crashes the app on large projects",
        "Getting a 500 error when I open the dashboard",
        "Sync is broken since the last update, files don't appear",
        "The editor freezes when I paste a table",
    ],
    "feature": [
        "It would be great to have dark mode on mobile",
        "Please add an API endpoint for bulk tag updates",
        "Could you add support for SAML single sign-on?",
        "I wish I could schedule reports weekly",
    ],
    "account": [
        "I can't log in after resetting my password",
        "How do I change the email address on my account?",
        "Locked out after enabling 2FA on a lost phone",
        "Please merge my two accounts into one",
    ],
    "other": [
        "Do you have an office in Lisbon?",
        "Thanks for the quick help yesterday!",
        "Who is your data protection officer?",
    ],
}
DETAILS = [
    "This is urgent for our team.",
    "We are on the Business plan.",
    "Happened around 10:00 UTC.",
    "Screenshots attached in the previous email.",
    "",
    "Customer since 2019, never had this before.",
]


def write_tickets(path: Path, count: int, *, seed: int = 7, bad_rows: bool = False) -> None:
    rng = random.Random(seed)
    labels = list(SUBJECTS)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["ticket_id", "body"])
        for number in range(1, count + 1):
            label = rng.choice(labels)
            body = f"{rng.choice(SUBJECTS[label])}. {rng.choice(DETAILS)}".strip()
            writer.writerow([f"T{number:07d}", body])
            if bad_rows and number == count // 3:
                out.write("T-broken,this row has,one column too many\r\n")
            if bad_rows and number == 2 * count // 3:
                writer.writerow(["", "a ticket without an id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bad-rows", action="store_true", help="add two malformed rows")
    args = parser.parse_args(argv)
    write_tickets(args.path, args.count, seed=args.seed, bad_rows=args.bad_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
