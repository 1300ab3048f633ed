"""Retention's rules as pure functions: no manager, no files, no processes."""

from __future__ import annotations

import pytest

from checkpoint.retention import stale_uncommitted, steps_to_delete


@pytest.mark.parametrize("verified, newest, keep_last, keep_every, deleted", [
    ([10, 20, 30, 40], 40, 2, 0, {10, 20}),          # the last two
    ([10, 20, 30, 40], 40, 0, 0, set()),             # 0 keeps all
    ([10, 20, 30, 40, 50], 50, 1, 20, {10, 30}),     # multiples of 20 stay too
    ([20, 30], 15, 1, 0, set()),                     # newer than the commit just made: not ours to judge
    ([10, 20, 30], 15, 1, 0, {10}),                  # the newest commit stays even if keep_last says 30
    ([10, 40], 40, 1, 0, {10}),                      # only verified steps count: a corrupt 20/30 takes no slot
    ([], 10, 3, 0, set()),
])
def test_steps_to_delete(verified, newest, keep_last, keep_every, deleted):
    assert steps_to_delete(verified, newest, keep_last, keep_every) == deleted


def test_stale_uncommitted_spares_a_save_in_flight():
    assert stale_uncommitted([5, 25, 35], newest=30) == {5, 25}
