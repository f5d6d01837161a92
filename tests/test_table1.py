"""Table I in one command: every row trained, scored on test, written beside the paper's numbers."""

import json

from busi_jax import table1
from configs import table1 as table1_config

from conftest import _data_fields


def _tiny(config, data_dir, results_md):
    for k, v in _data_fields(data_dir).items():
        config.data[k] = v
    for name in ("unet", "unetpp", "sunet"):
        seg = config[name]
        seg.model.features, seg.model.depth = 4, 2
        seg.num_epochs, seg.batch_size, seg.eval_batch_size = 1, 4, 8
        seg.progress = False
    cls = config.classifier
    cls.model.features, cls.num_epochs, cls.batch_size, cls.progress = (4, 8), 1, 4, False
    config.n_boot, config.plots = 20, False
    config.results_md = str(results_md)
    return config


def test_table1_trains_every_row_and_rewrites_only_its_section(tiny_data_dir, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nhand-written text\n")
    config = _tiny(table1_config.get_config(), tiny_data_dir, results)
    rows = table1.run(config, tmp_path / "wd")

    assert set(rows) == {"unet", "unetpp", "sunet", "classifier_gt", "pipeline"}
    assert rows["pipeline"]["report"]["classification"]["masks"] == "predicted"
    assert rows["classifier_gt"]["report"]["classification"]["masks"].startswith("ground_truth")
    # The pipeline's segmenter is the U-Net++ row, reused rather than retrained.
    pipe = json.loads((tmp_path / "wd" / "pipeline" / "final_metrics.json").read_text())
    assert pipe["segmenter_workdir"] == str(tmp_path / "wd" / "unetpp")

    text = results.read_text()
    assert text.startswith("# Results\n\nhand-written text\n")
    assert text.count(table1.BEGIN) == 1 and text.count(table1.END) == 1
    body = text[text.index(table1.BEGIN) :]
    assert "0.9907" in body  # the paper's U-Net++ accuracy, quoted beside ours
    assert "synthetic phantoms" in body and "| U-Net++ + CNN (predicted masks) |" in body
    table = [line for line in body.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 5 and all(line.count("|") == 13 for line in table)
    assert (tmp_path / "wd" / "table1.md").read_text() in text

    # A second write replaces the section instead of appending another.
    table1.write_section(results, (tmp_path / "wd" / "table1.md").read_text())
    assert results.read_text() == text
