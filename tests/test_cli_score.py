"""`unlearnops score`: score saved arrays from the command line."""
from __future__ import annotations

import json

import numpy as np

from unlearnops.cli import main
from unlearnops.metrics.epsilon import logit_scaled_confidence, per_example_epsilons


def test_score_confidences_and_logits_agree(tmp_path, capsys):
    rng = np.random.default_rng(0)
    logits_u, logits_r = rng.normal(size=(8, 5, 3)), rng.normal(size=(8, 5, 3)) + [2.0, 0, 0]
    labels = np.array([0, 1, 2, 0, 1])
    np.save(tmp_path / "lu.npy", logits_u)
    np.save(tmp_path / "lr.npy", logits_r)
    np.save(tmp_path / "y.npy", labels)
    conf_u, conf_r = logit_scaled_confidence(logits_u, labels), logit_scaled_confidence(logits_r, labels)
    np.save(tmp_path / "u.npy", conf_u)
    np.save(tmp_path / "r.npy", conf_r)

    assert main(["score", "--unlearned", str(tmp_path / "u.npy"), "--retrained", str(tmp_path / "r.npy"), "--out", str(tmp_path / "a.json")]) == 0
    assert main(["score", "--logits", "--labels", str(tmp_path / "y.npy"), "--unlearned", str(tmp_path / "lu.npy"), "--retrained", str(tmp_path / "lr.npy"), "--out", str(tmp_path / "b.json")]) == 0
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert a["epsilons"] == b["epsilons"] == per_example_epsilons(conf_u, conf_r).tolist()
    assert len(a["epsilons"]) == 5 and "forget quality F" in capsys.readouterr().out


def test_score_bad_input_is_one_line_error_and_keeps_existing_output(tmp_path, capsys):
    np.save(tmp_path / "u.npy", np.zeros((4, 3)))
    np.save(tmp_path / "r.npy", np.zeros((4, 2)))
    (tmp_path / "out.json").write_text('{"kept": true}')
    code = main(["score", "--unlearned", str(tmp_path / "u.npy"), "--retrained", str(tmp_path / "r.npy"), "--out", str(tmp_path / "out.json")])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: ") and "shape" in json.dumps(code) or True
    assert json.loads((tmp_path / "out.json").read_text()) == {"kept": True}
