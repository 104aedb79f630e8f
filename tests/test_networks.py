"""Every registered network, from its spec alone (``fer_core.models.catalog``): a new network file
is checked here without editing this test."""

from __future__ import annotations

import pytest

from fer_core.models.catalog import list_networks
from model_checks import check_network


@pytest.mark.slow  # trains and exports every network
@pytest.mark.parametrize("name", list_networks())
def test_network_spec_builds_trains_and_exports(name, tmp_path):
    check_network(name, tmp_path)
