"""``fer demo`` (= ``make demo``): the whole platform end to end on generated data, on one machine.

1. SynthFACS data is written in each network's real dataset format (FER2013 CSV, AffectNet,
   CASME II, DFEW, AU tables) under ``<FER_HOME>/sources``;
2. the embedded Triton server starts on 127.0.0.1;
3. the ``retrain_all`` flow runs with the quick profile: ingest (data gate + DVC) → train (MLflow)
   → ONNX export + parity → gated promotion into Triton, for all five networks;
4. a few held-out test samples per network go through the ensembles (raw images or clips in,
   labels out) and are printed beside their true labels;
5. it prints where to look: MLflow UI, Great Expectations Data Docs, the Prefect run, Triton.

The demo's promotion gates are relaxed (no metric floor, a generous latency budget): quick CPU models
on a few hundred generated faces are far from paper numbers, and a shared CPU makes latency noisy. A second
``fer demo`` on the same workspace reuses the data and skips unchanged networks.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

# Samples per generated dataset: each network spec's ``demo_size`` (enough for its quick profile to
# learn well above chance, while the whole demo stays well inside 15 minutes on a 2-core CPU).
DEMO_GATES = {"floor": 0.0, "margin": 0.02, "latency_budget_ms": 1000.0, "smoke_samples": 8, "latency_requests": 20}
SAMPLES_PER_NETWORK = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the whole pipeline on generated data (what `make demo` runs)",
        description="Generate data in each real format, run retrain_all (quick profile) for all five networks, "
        "promote into the embedded Triton, answer a few inference requests through the ensembles and print "
        "where to look (MLflow UI, GX Data Docs, Prefect run, Triton endpoint).",
    )
    p.add_argument("--networks", "-n", nargs="+", default=None, metavar="NETWORK",
                   help="subset of the networks (default: every default network spec; see `fer train --list`)")
    p.add_argument("--keep-serving", action="store_true", help="keep Triton running after the demo until Ctrl-C")
    p.set_defaults(func=_demo)


def _generate_sources(sources: dict[str, tuple[str, str, str]], networks: list[str]) -> None:
    from fer_core.data.formats import get_format
    from fer_core.models.catalog import get_network

    for network in networks:
        _, fmt, path = sources[network]
        if Path(path).exists():
            print(f"  {fmt:10s} {path} (exists, reused)")
            continue
        start = time.perf_counter()
        size = get_network(network).demo_size
        get_format(fmt).write_synthetic(Path(path), seed=0, size=size)
        print(f"  {fmt:10s} {path} ({size} samples, {time.perf_counter() - start:.1f}s)")


def _test_samples(dataset: str, count: int, workspace: Any) -> list[tuple[Any, str]]:
    """Raw inputs (image or clip arrays) of the first test rows of a dataset's working copy, with their truth."""
    from fer_core.data.manifest import read_card, read_manifest
    from fer_core.data.samples import read_clip, read_image
    from registry.datasets import DatasetStore

    root = DatasetStore(workspace).path(dataset)
    card, df = read_card(root), read_manifest(root)
    split = next(s for s in ("test", "val", "train") if (df["split"] == s).any())
    rows = df[df["split"] == split].head(count)
    samples = []
    for _, row in rows.iterrows():
        pixels = read_clip(root, row["path"]) if card.task in ("micro", "dynamic") else read_image(root, row["path"])
        if card.task == "au":
            truth = "AUs " + ",".join(n for n, v in zip(card.au_names, row["aus"]) if v == 1) if "aus" in row else "?"
        else:
            truth = card.classes[int(row["label"])] if 0 <= int(row["label"]) < len(card.classes) else "?"
        samples.append((pixels, truth))
    return samples


def _answer_requests(url: str, sources: dict[str, tuple[str, str, str]], networks: list[str], workspace: Any) -> None:
    from serving.client import FERClient

    # With face detection off (the default) requests are face crops and FACE_FOUND is always false.
    detecting = workspace.settings.face_detection != "off"
    with FERClient(url) as client:
        served = set(client.networks())
        for network in networks:
            if network not in served:
                print(f"  {network:14s} not served (not promoted)")
                continue
            samples = _test_samples(sources[network][0], SAMPLES_PER_NETWORK, workspace)
            start = time.perf_counter()
            predictions = client.predict([pixels for pixels, _ in samples], network=network)
            ms = (time.perf_counter() - start) * 1e3 / max(1, len(samples))
            for (_, truth), prediction in zip(samples, predictions):
                extra = f" active={','.join(prediction.active)}" if prediction.active is not None else ""
                face = f"face found: {prediction.face_found}; " if detecting else ""
                print(f"  {network:14s} predicted {prediction.label:10s} p={prediction.confidence:.2f}{extra}  "
                      f"(true: {truth}; {face}{ms:.0f} ms/request)")


def _demo(args: argparse.Namespace) -> int:
    from fer_platform.workspace import Workspace
    from flows import configure_prefect

    workspace = Workspace.load().ensure()  # this command's platform context
    configure_prefect(workspace.settings)
    from fer_cli.pipeline import print_rows
    from fer_core.errors import UsageError
    from flows.retrain_all import default_networks, default_sources, retrain_all
    from serving.repository import ModelRepository
    from serving.server import EmbeddedTriton

    networks = list(args.networks or default_networks())
    known = list(default_sources(workspace))
    unknown = sorted(set(networks) - set(known))
    if unknown:
        raise UsageError(f"unknown networks {unknown}; the demo knows {', '.join(known)}")
    sources = default_sources(workspace)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    print(f"[1/4] generated data in the real formats (workspace {workspace.root})", flush=True)
    _generate_sources(sources, networks)
    timings["data generation"] = time.perf_counter() - t0

    print("[2/4] starting the embedded Triton server", flush=True)
    t = time.perf_counter()
    repository = ModelRepository.of_workspace(workspace)
    triton = EmbeddedTriton(repository, workspace.root / "triton", models=repository.load_order()).start(strict=False)
    timings["triton start"] = time.perf_counter() - t
    url = f"grpc://{triton.grpc_url}"
    state = None
    try:
        print("[3/4] retrain_all (quick profile): ingest → train → export → promote, per network", flush=True)
        t = time.perf_counter()
        state = retrain_all(networks=networks, profile="quick", gates={n: DEMO_GATES for n in networks},
                            triton_url=url, return_state=True)
        timings["retrain_all"] = time.perf_counter() - t
        rows = state.result(raise_on_failure=False)
        if isinstance(rows, list):
            print_rows(rows)
        else:
            print(f"  retrain_all {state.name}: {state.message}")

        print("[4/4] inference requests through the ensembles (raw test images / clips in)", flush=True)
        t = time.perf_counter()
        _answer_requests(url, sources, networks, workspace)
        timings["inference"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        print("\ntimings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
        docs = workspace.gx_docs / "uncommitted" / "data_docs" / "local_site" / "index.html"
        print("\nwhere to look:")
        print("  MLflow runs, plots and the model registry:  fer ui   (then http://127.0.0.1:5000)")
        print(f"  Great Expectations Data Docs:               {docs}")
        print(f"  Prefect flow run {state.state_details.flow_run_id} ({state.name}), table artifact "
              f"'retrain-all-summary': PREFECT_HOME={os.environ['PREFECT_HOME']} prefect server start  (UI on :4200)")
        print(f"  Triton (gRPC {triton.grpc_url}, HTTP off, metrics {triton.metrics_url});"
              " after the demo: fer serve")
        if args.keep_serving:
            print("serving until Ctrl-C ...", flush=True)
            while triton.running:
                time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        triton.stop()
    if state is not None and state.is_failed():
        from fer_cli.main import EXIT_ERROR, CommandError

        raise CommandError(f"retrain_all failed: {state.message}", EXIT_ERROR)
    return 0
