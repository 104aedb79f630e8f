"""The code fingerprint (part of the retrain cache key) follows each network's own sources."""

from fer_core.training import fingerprint


def test_a_model_file_change_changes_only_that_networks_fingerprint(monkeypatch):
    networks = ("ca_resnet", "multitask_fer", "micro_lsh", "c3d_ecstfl", "au_cotrain")
    before = {n: fingerprint.code_fingerprint(n) for n in networks}
    assert "fer_core.models.ca_resnet" in fingerprint.code_modules("ca_resnet")
    real = fingerprint._read_source
    monkeypatch.setattr(fingerprint, "_read_source",
                        lambda name: real(name) + (b"# fix" if name == "fer_core.models.ca_resnet" else b""))
    after = {n: fingerprint.code_fingerprint(n) for n in networks}
    assert [n for n in networks if after[n] != before[n]] == ["ca_resnet"]
