"""The tier tables: complete, reasoned, and never shrinking from one tier to the next."""

from __future__ import annotations

import itertools

import pytest

from sizing.spec import TIERS
from sizing.tiers import ROLE_INFO, TIER_SIZES, Role


def test_every_tier_sizes_every_role() -> None:
    assert set(TIER_SIZES) == set(TIERS)
    for users, sizes in TIER_SIZES.items():
        assert set(sizes) == set(Role), users


@pytest.mark.parametrize("users", TIERS)
def test_every_number_has_a_reason_and_fits_its_block(users: int) -> None:
    for role, size in TIER_SIZES[users].items():
        assert len(size.reason) > 20, (users, role)
        info = ROLE_INFO[role]
        assert size.count <= info.capacity
        if info.fixed_count is not None:
            assert size.count == info.fixed_count, (users, role)
        assert size.disks_gb and all(d > 0 for d in size.disks_gb)


def test_sizes_never_shrink_when_the_tier_grows() -> None:
    for lower, higher in itertools.pairwise(TIERS):
        for role in Role:
            a, b = TIER_SIZES[lower][role], TIER_SIZES[higher][role]
            assert b.count >= a.count, (role, lower, higher)
            assert b.vcpu >= a.vcpu and b.memory_gb >= a.memory_gb, (role, lower, higher)
            assert len(b.disks_gb) >= len(a.disks_gb)
            assert all(y >= x for x, y in zip(a.disks_gb, b.disks_gb, strict=False))


def test_combined_nodes_at_100_then_dedicated_workers() -> None:
    assert TIER_SIZES[100][Role.APPS_AGENT].count == 0
    assert TIER_SIZES[100][Role.APPS_SERVER].count == 3
    for users in (500, 1000, 10000):
        assert TIER_SIZES[users][Role.APPS_AGENT].count >= 3
        assert TIER_SIZES[users][Role.MIDDLEWARE_AGENT].count >= 3
    assert all(TIER_SIZES[u][Role.DMZ_SERVER].count == 3 for u in TIERS)
