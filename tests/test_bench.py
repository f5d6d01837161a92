"""The speed benchmark's plumbing on tiny shapes (busi_jax.bench).

Timings here are meaningless (1 step of a width-4, depth-2 net on 32-px scans);
the tests check the row schema, the FLOP count, the JSON file and that
PyTorch stays optional. CPU budget: two small train-step compilations.
"""

import contextlib
import io
import json
import math
import sys

import pytest

from busi_jax import bench
from busi_jax.models.conv import bf16_kernels_available

TINY = {"batch": 2, "image_size": 32, "depth": 2}
TINY_ARGS = [
    "--quick",
    "--models=unetpp",
    "--widths=4",
    "--depth=2",
    "--image_size=32",
    "--batch=2",
    "--steps=1",
    "--infer_reps=1",
    "--matmul_n=64",
    "--inprocess",
]


@pytest.fixture(scope="module")
def no_torch_run(tmp_path_factory):
    """``python -m busi_jax.bench --quick`` at tiny settings with torch unimportable.

    Returns:
        ``(exit status, stdout and stderr, the JSON written)``.
    """
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        # A None entry in sys.modules makes `import torch` raise ImportError.
        mp.setitem(sys.modules, "torch", None)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = bench.main([*TINY_ARGS, f"--output={out}"])
    return status, stdout.getvalue() + stderr.getvalue(), json.loads(out.read_text())


def test_jax_row_schema(no_torch_run):
    status, _, result = no_torch_run
    assert status == 0
    assert set(result) == {"header", "rows"}
    # --quick times XLA's weight gradient, the C++ kernel's and, on CPUs with
    # AMX or AVX-512 BF16, the bf16 kernels.
    row, native_row, *bf16_rows = result["rows"]
    assert native_row["layout"] == "nhwc/native" and native_row["train_img_per_s"] > 0
    # On AVX-512 BF16 without AMX, the models' default winograd=True is named.
    expected = ["nhwc/native_bf16"] if bf16_kernels_available() else []
    if bench._winograd_runs("native_bf16", True):
        expected = ["nhwc/native_bf16/winograd"]
    assert [r["layout"] for r in bf16_rows] == expected
    assert tuple(row) == bench.ROW_FIELDS
    assert (row["framework"], row["model"], row["width"], row["precision"], row["batch"]) == (
        "jax",
        "unetpp",
        4,
        "fp32",
        2,
    )
    assert row["layout"] == "nhwc"
    for field in (
        "train_img_per_s",
        "infer_ms_b1",
        "peak_rss_mb",
        "gflop_per_step",
        "fraction_of_peak",
    ):
        assert isinstance(row[field], float) and math.isfinite(row[field]) and row[field] > 0, field
    machine = result["header"]["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["date"]
    assert machine["versions"]["jax"] and machine["versions"]["torch"] is None
    peaks = result["header"]["matmul_peak_gflops"]
    assert peaks["jax"]["fp32"] > 0 and peaks["jax"]["bf16"] > 0
    assert result["header"]["param_counts"]["unetpp_w4"]["flax"] == 8201


def test_torch_rows_skipped_with_a_note(no_torch_run):
    _, stdout, result = no_torch_run
    assert all(r["framework"] == "jax" for r in result["rows"])
    assert any("PyTorch is not importable" in n for n in result["header"]["notes"])
    assert "PyTorch is not importable" in stdout
    assert result["header"]["matmul_peak_gflops"]["pytorch"] is None
    (ratio,) = result["header"]["ratios"]
    assert ratio["jax_fp32_over_torch_fp32_channels_last"] is None


def test_flops_positive_and_grow_with_width(no_torch_run):
    _, _, result = no_torch_run
    w4, w8 = (bench.jax_step_flops("unetpp", w, **TINY) for w in (4, 8))
    assert 0 < w4 < w8
    # Convolutions dominate: doubling the width roughly quadruples the work.
    assert 2.5 < w8 / w4 < 4.5
    # The lowered program's count (no compile) is close to the compiled one's.
    compiled_w4 = result["rows"][0]["gflop_per_step"] * 1e9
    assert w4 == pytest.approx(compiled_w4, rel=0.15)


def test_fraction_of_peak_and_ratios():
    jax_row = {"framework": "jax", "model": "unet", "width": 8, "precision": "fp32"}
    jax_row.update(layout="nhwc", gflop_per_step=10.0, _step_s=0.5, train_img_per_s=32.0)
    bench.add_fraction_of_peak(jax_row, {"fp32": 100.0, "bf16": 400.0})
    assert jax_row["fraction_of_peak"] == pytest.approx(0.2)
    rows = [
        jax_row,
        {**jax_row, "precision": "bf16", "train_img_per_s": 48.0},
        {**jax_row, "framework": "pytorch", "layout": "channels_last", "train_img_per_s": 16.0},
        {**jax_row, "framework": "pytorch", "layout": "nchw", "train_img_per_s": 8.0},
        {**jax_row, "framework": "pytorch", "precision": "bf16", "layout": "channels_last"},
    ]
    rows[-1]["train_img_per_s"] = 24.0
    (r,) = bench.ratios(rows)
    assert r["jax_fp32_over_torch_fp32_channels_last"] == pytest.approx(2.0)
    assert r["jax_best_over_torch_bf16"] == pytest.approx(2.0)
    # An AMX row multiplies in bf16: it counts as best, never as fp32, and
    # is measured against the bf16 peak.
    amx_row = {**jax_row, "layout": "nhwc/native_amx", "train_img_per_s": 96.0}
    bench.add_fraction_of_peak(amx_row, {"fp32": 100.0, "bf16": 400.0})
    assert amx_row["fraction_of_peak"] == pytest.approx(0.05)
    (r,) = bench.ratios([*rows, amx_row])
    assert r["jax_fp32_over_torch_fp32_channels_last"] == pytest.approx(2.0)
    assert r["jax_best_over_torch_fp32_channels_last"] == pytest.approx(6.0)
    assert r["jax_best_over_torch_bf16"] == pytest.approx(4.0)
    # So does a row on the AVX-512 BF16 kernels.
    avx_row = {**amx_row, "layout": "nhwc/native_bf16"}
    bench.add_fraction_of_peak(avx_row, {"fp32": 100.0, "bf16": 400.0})
    assert avx_row["fraction_of_peak"] == pytest.approx(0.05)
    (r,) = bench.ratios([*rows, avx_row])
    assert r["jax_fp32_over_torch_fp32_channels_last"] == pytest.approx(2.0)
    assert r["jax_best_over_torch_bf16"] == pytest.approx(4.0)


def test_rounds_alternate_the_frameworks_and_take_ratios_within_each(monkeypatch):
    """--rounds: each round times a network's JAX and PyTorch rows, in turn first; ratios
    compare rows of one round only, then take the median."""
    order = []
    # img/s per round: JAX 30, 20, 24 against PyTorch bf16 20, 25, 24.
    speed = {"jax": [30.0, 20.0, 24.0], "torch": [20.0, 25.0, 24.0]}

    def fake_measure(kind, spec, *args):
        if kind == "peaks":
            return {
                "jax": {"fp32": 1.0, "bf16": 2.0},
                "pytorch": None,
                "peak": {"fp32": 1.0, "bf16": 2.0},
            }
        rnd = sum(1 for k in order if k == kind)
        order.append(kind)
        row = {
            "framework": "jax" if kind == "jax" else "pytorch",
            "model": spec["model"],
            "width": spec["width"],
            "precision": spec["precision"],
            "batch": spec["batch"],
            "layout": "nhwc" if kind == "jax" else spec["layout"],
            "train_img_per_s": speed[kind][rnd],
            "gflop_per_step": 1.0,
            "_step_s": 1.0,
        }
        return {**row, "_params": spec["expected_params"]} if kind == "torch" else row

    monkeypatch.setattr(bench, "_measure", fake_measure)
    monkeypatch.setattr(bench, "import_torch", lambda: type("Torch", (), {"__version__": "x"}))
    result = bench.run_benchmark(
        ["unet"],
        [4],
        depth=2,
        jax_precisions=("bf16",),
        torch_variants=(("bf16", "channels_last"),),
        rounds=3,
        log=lambda s: None,
    )
    assert order == ["jax", "torch", "torch", "jax", "jax", "torch"]
    assert [(r["framework"], r["round"]) for r in result["rows"]] == [
        ("jax", 0),
        ("pytorch", 0),
        ("pytorch", 1),
        ("jax", 1),
        ("jax", 2),
        ("pytorch", 2),
    ]
    (r,) = result["header"]["ratios"]
    assert r["jax_best_over_torch_bf16_rounds"] == pytest.approx([1.5, 0.8, 1.0])
    # The median of the rounds' ratios, not a ratio of the best rows (30 / 25).
    assert r["jax_best_over_torch_bf16"] == pytest.approx(1.0)
    text = bench.format_table(result)
    assert "median over 3 rounds" in text and "1.00x [1.50, 0.80, 1.00]" in text
    _refused("--rounds=0", "--rounds must be >= 1")
    _refused("--jax_precisions=fp16", "--jax_precisions ['fp16'] not valid")
    _refused("--torch_variants=bf16/nchw", "--torch_variants ['bf16/nchw'] not valid")


@pytest.mark.parametrize("model", ["unetpp", "unet", "sunet"])
@pytest.mark.parametrize("depth", [2, 4])
def test_torch_twin_has_the_flax_parameter_count(model, depth):
    pytest.importorskip("torch")
    flax_n = bench.flax_param_count(model, 4, depth)
    assert bench.torch_param_count(bench.torch_model(model, 4, depth)) == flax_n


def test_torch_row_schema():
    pytest.importorskip("torch")
    row = bench.time_torch(
        "unetpp",
        4,
        "fp32",
        "channels_last",
        steps=1,
        infer_reps=1,
        expected_params=8201,
        **TINY,
    )
    assert tuple(bench.public_row(row)) == bench.ROW_FIELDS
    assert row["framework"] == "pytorch" and row["train_img_per_s"] > 0
    with pytest.raises(AssertionError, match="parameters"):
        bench.time_torch("unet", 4, "fp32", "nchw", steps=1, expected_params=1, **TINY)


def _main_rows(tmp_path, *flags):
    """bench.main at tiny settings with torch unimportable; its exit status and rows."""
    out = tmp_path / "bench.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch", None)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            status = bench.main([*TINY_ARGS, *flags, f"--output={out}"])
    return status, json.loads(out.read_text())["rows"]


def _refused(flag, message):
    """bench.main with one bad flag: exit status 1 and ``message`` on stderr."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert bench.main([*TINY_ARGS, flag]) == 1
    assert message in err.getvalue()


def test_native_wgrad_rows(tmp_path):
    """--jax_wgrad / --jax_wgrad_chunks add JAX rows labelled in their layout; the C++
    kernel's row reports the same FLOP count as XLA's."""
    status, rows = _main_rows(tmp_path, "--jax_wgrad=xla,native", "--jax_wgrad_chunks=1,2")
    assert status == 0
    assert [r["layout"] for r in rows] == ["nhwc", "nhwc/wgrad2", "nhwc/native"]
    assert all(r["train_img_per_s"] > 0 for r in rows)
    assert rows[2]["gflop_per_step"] == pytest.approx(rows[0]["gflop_per_step"], rel=1e-6)
    _refused("--jax_wgrad=fast", "--jax_wgrad ['fast'] not valid")


@pytest.mark.skipif(
    not bench._winograd_runs("native_bf16", True), reason="Winograd runs on AVX-512 BF16 only"
)
def test_winograd_on_and_off_rows(tmp_path):
    """--jax_winograd=on,off: a bf16-kernel row each, labelled; a bad value is refused."""
    status, rows = _main_rows(tmp_path, "--jax_wgrad=native_bf16", "--jax_winograd=on,off")
    assert status == 0
    assert [r["layout"] for r in rows] == ["nhwc/native_bf16/winograd", "nhwc/native_bf16"]
    assert all(r["train_img_per_s"] > 0 for r in rows)
    _refused("--jax_winograd=maybe", "--jax_winograd ['maybe'] not valid")


@pytest.mark.skipif(
    not bench._winograd_runs("native_bf16", True), reason="Winograd runs on AVX-512 BF16 only"
)
def test_winograd_layers_mode(tmp_path):
    """--winograd_layers times direct and Winograd per shape, forward and weight gradient;
    all near exact."""
    shapes = ((16, 16, 16), (8, 32, 48))
    rows, text = _layer_rows(tmp_path, "--winograd_layers", "WINOGRAD_LAYER_SHAPES", shapes)
    for r in rows:
        for p in ("", "wgrad_"):  # The forward pass, then the weight gradient.
            assert r[p + "direct_ms"] > 0 and r[p + "winograd_ms"] > 0 and r[p + "speedup"] > 0
            assert r[p + "direct_rel_err"] < 1e-2 and r[p + "winograd_rel_err"] < 2e-2
        assert r["wgrad_direct_rel_err"] < 1e-5  # Exact products, float32 sums.
    assert "Wino ms" in text and "weight gradient" in text


def _layer_rows(tmp_path, mode, shapes_name, shapes):
    """bench.main in a per-layer mode over ``shapes`` (patched in as ``shapes_name``),
    batch 2: its rows (checked to be those shapes, in order) and printed text."""
    out = tmp_path / "layers.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, shapes_name, shapes)
        with contextlib.redirect_stdout(io.StringIO()) as text:
            assert bench.main([mode, "--batch=2", "--steps=1", f"--output={out}"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["side"], r["c_in"], r["c_out"]) for r in rows] == list(shapes)
    return rows, text.getvalue()


def test_wgrad_layers_mode(tmp_path):
    """--wgrad_layers times XLA's and the C++ weight gradient per shape; both agree."""
    shapes = ((8, 1, 16), (8, 16, 32))
    rows, text = _layer_rows(tmp_path, "--wgrad_layers", "WGRAD_LAYER_SHAPES", shapes)
    for r in rows:
        assert r["xla_ms"] > 0 and r["native_ms"] > 0 and r["max_rel_diff"] < 1e-4
    assert "speedup" in text


def test_profile_mode_sums_time_per_op(tmp_path):
    """--profile traces a step and attributes its time to XLA ops, the C++ kernel included."""
    out = tmp_path / "profile.json"
    args = ["--profile", str(tmp_path / "trace"), "--models=unetpp", "--widths=8", "--depth=2"]
    args += ["--image_size=32", "--batch=2", "--steps=1", "--jax_wgrad=native", f"--output={out}"]
    with contextlib.redirect_stdout(io.StringIO()) as text:
        assert bench.main(args) == 0
    prof = json.loads(out.read_text())
    assert prof["step_ms"] > 0
    ops = {o["op"]: o for o in prof["ops"]}
    # The C++ calls by target: the weight gradient, and the BatchNorm + ReLU kernel.
    assert ops["ffi:busi_conv_wgrad"]["count"] > 0
    assert "ffi:busi_bn_relu_forward" in ops and "ffi_call" not in ops
    assert all(o["ms_per_step"] >= 0 for o in prof["ops"])
    assert "ms per step (traced)" in text.getvalue()
    assert list((tmp_path / "trace").rglob("*.trace.json.gz"))


def test_worker_applies_keep_freed_memory_before_measuring(tmp_path, monkeypatch):
    """--keep_freed_memory reaches every worker as a setting, not as a timing argument."""
    import json

    from busi_jax import bench, memory

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setitem(bench._WORKERS, "echo", lambda **kw: calls.append(kw) or {"ok": 1})
    out = tmp_path / "r.json"
    for keep in (False, True):
        spec = {"kind": "echo", "n": 3, "keep_freed_memory": keep, "out": str(out)}
        bench._worker_main(json.dumps(spec))
    assert calls == [{"n": 3}, "keep", {"n": 3}]
    assert json.loads(out.read_text()) == {"ok": 1}
