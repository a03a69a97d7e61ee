"""Results store and ensembles over REAL Ray Tune experiment dirs with crafted predictions.

:func:`classification_experiment` runs small Tuner experiments whose function trainable
reports its rows as :class:`pefttune.schema.TrialReport` and writes checkpoints in the schema's
layout (``model/placement.json``, ``state.json``, ``predictions/{dev,test}.safetensors``
in the format of :func:`pefttune.training.save_predictions`) with known predictions:

* test labels ``y = [0,1,2,0,1,2,0,1,2,0]`` (example ids 100..109), 3 classes; a wrong
  member predicts ``(y+1) % 3``; dev: 20 examples, ``y = i % 3``;
* uniform lora / bitfit / sequential: wrong on the disjoint test sets {0,1,2}, {3,4,5},
  {6,7,8} (0.7 each), dev 0.90 / 0.80 / 0.70; bitfit stores its rows in reverse order;
* discrete (dev 0.85, test wrong {0,3,6,9}: 0.6), hybrid (dev 0.60, test 0.5);
* an errored trial (perfect predictions, ERROR), an early-stopped one (1 of 2 epochs),
  an over-budget one (epoch 0, no checkpoint);
* ``darts/``: a DARTS search trial reporting ``alpha/Lxx/<method>`` (history only in
  ``progress.csv``); ``darts-retrain/``: a darts-derived trial (dev 0.75, test wrong
  {1,2,3}: 0.7; Ray loggers off, so only its last result is on disk).

Known answers: per-method (lora, bitfit, sequential) vote = weighted = soft = 1.0,
Caruana picks only lora (0.7); top-3 = lora, discrete, bitfit, whose vote is 0.8.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pefttune.analysis import ensembles as E
from pefttune.analysis.ensemble_runner import load_members, run_ensembles
from pefttune.analysis.selection import best_per_method, select_members, top_k
from pefttune.analysis.store import MissingPredictionsError, open_results

TEST_Y = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
DEV_N = 20


def _spec(name, kind, layers, params, dev_wrong, test_wrong, conf=0.6, method=None, **extra):
    return {"name": name, "kind": kind, "method": method, "layers": layers, "params": params,
            "dev_wrong": list(dev_wrong), "test_wrong": list(test_wrong), "conf": conf, "epochs": 2, **extra}


MAIN_TRIALS = [
    _spec("lora", "uniform", ["lora"] * 4, 1000, range(2), [0, 1, 2], 0.7, "lora"),
    _spec("bitfit", "uniform", ["bitfit"] * 4, 300, range(2, 6), [3, 4, 5], 0.6, "bitfit", reverse=True),
    _spec("sequential", "uniform", ["sequential"] * 4, 2000, range(6, 12), [6, 7, 8], 0.5, "sequential"),
    _spec("discrete", "discrete", ["lora", "none", "bitfit", "lora"], 800, range(12, 15), [0, 3, 6, 9], 0.55),
    _spec("hybrid", "hybrid", ["sequential+lora"] * 4, 3000, range(8), [0, 1, 2, 3, 4], 0.6),
    _spec("errored", "discrete", ["lora", "lora", "none", "none"], 5000, [], [], 0.9, fail=True),
    _spec("early", "discrete", ["none", "bitfit", "bitfit", "none"], 700, [0], [], 0.6, stop_after=1),
    _spec("over", "discrete", ["sequential"] * 4, 99999, [], [], 0.6, over_budget=True),
]
DARTS_TRIALS = [_spec("darts", "darts", ["lora+bitfit"] * 4, 1400, [], [], 0.6, alpha=True, epochs=3)]
RETRAIN_TRIALS = [_spec("derived", "darts-derived", ["lora", "bitfit", "lora", "none"], 900, range(5), [1, 2, 3], 0.6)]

# CTC: refs and correct frame paths (blank 0, V = 4); each member corrupts one frame.
CTC_TRIALS = [
    {"name": m, "kind": "uniform", "method": m, "layers": [m] * 4, "params": p, "corrupt": c, "epochs": 1}
    for m, p, c in (("lora", 1000, [0, 2, 3]), ("bitfit", 300, [1, 0, 1]), ("sequential", 2000, [2, 2, 2]))
]


def _make_trainable():
    """A local function, so cloudpickle ships it by value to Ray's workers."""

    def _trainable(config):
        """A Ray Tune function trainable with pefttune's result columns and checkpoint layout."""
        import json as _json
        import os as _os
        import tempfile as _tempfile

        import numpy as _np
        from ray import tune

        from safetensors.numpy import save_file

        from pefttune.schema import (MODEL_DIR, PREDICTIONS_DIR, STATE_FILE, CheckpointState, TrialReport, metric_key,
                                     predictions_file, state_json)

        class Evaluation:  # pefttune.training.Evaluation's fields, without importing torch in workers
            def __init__(self, metric, score, loss, arrays):
                self.metric, self.score, self.loss, self.arrays = metric, score, loss, arrays

        def save_predictions(path, evaluation):  # = pefttune.training.save_predictions
            save_file({k: _np.ascontiguousarray(v) for k, v in evaluation.arrays.items()}, str(path))

        spec = config["trial"]
        task = spec.get("task", "classification")
        metric = "accuracy" if task == "classification" else "per"
        layers = spec["layers"]
        placement = {"num_layers": len(layers),
                     "layers": [[{"method": m} for m in label.split("+")] if label != "none" else [] for label in layers]}
        columns = {
            "placement": _json.dumps(placement), "placement_short": " ".join(f"L{i}:{m}" for i, m in enumerate(layers)),
            **{f"layer_{i:02d}": m for i, m in enumerate(layers)},
            "kind": spec["kind"], "method": spec["method"] or "", "lr": 0.001,
            "peft_params": spec["params"] - 10, "head_params": 10, "trainable_params": spec["params"],
            **({"seed": spec["seed"]} if "seed" in spec else {}),
            **({"config_id": spec["config_id"]} if "config_id" in spec else {}),
        }
        if spec.get("over_budget"):
            tune.report(TrialReport(metric, columns, epoch=0, scores={metric_key("dev", metric): 0.0}, best_dev=0.0,
                                    over_budget=True).row())
            return

        def classification(labels, index, wrong, conf, reverse):
            labels = _np.asarray(labels, dtype=_np.int64)
            wrong = set(wrong)
            pred = _np.array([(y + 1) % 3 if i in wrong else y for i, y in enumerate(labels)], dtype=_np.int64)
            probs = _np.full((len(labels), 3), (1.0 - conf) / 2, dtype=_np.float32)
            probs[_np.arange(len(labels)), pred] = conf
            order = _np.arange(len(labels))[::-1] if reverse else _np.arange(len(labels))
            arrays = {"index": _np.asarray(index, dtype=_np.int64)[order], "label": labels[order],
                      "pred": pred[order], "probs": probs[order]}
            return Evaluation(metric, float(_np.mean(pred == labels)), 0.5, arrays)

        def ctc(corrupt):
            paths = [[1, 0, 2, 0], [3, 3, 0, 0], [1, 1, 3, 0], [0, 2, 0]]
            refs = [[1, 2], [3], [1, 3], [2]]
            ex, frame, label = corrupt
            paths = [list(p) for p in paths]
            paths[ex][frame] = label
            lp = _np.zeros((4, 4, 4), dtype=_np.float32)
            hyps = []
            for n, path in enumerate(paths):
                for t, lab in enumerate(path):
                    row = _np.full(4, 0.1)
                    row[lab] = 0.7
                    lp[n, t] = _np.log(row)
                hyp, prev = [], None
                for lab in path:
                    if lab != prev and lab != 0:
                        hyp.append(lab)
                    prev = lab
                hyps.append(hyp)
            flat = lambda seqs: _np.array([t for s in seqs for t in s], dtype=_np.int64)  # noqa: E731
            lens = lambda seqs: _np.array([len(s) for s in seqs], dtype=_np.int64)  # noqa: E731
            arrays = {"index": _np.arange(4, dtype=_np.int64), "log_probs": lp,
                      "frames": _np.array([len(p) for p in paths], dtype=_np.int64),
                      "hyp_flat": flat(hyps), "hyp_len": lens(hyps), "ref_flat": flat(refs), "ref_len": lens(refs)}
            edits = 1.0 / 6.0
            return Evaluation(metric, edits, 0.5, arrays)

        if task == "classification":
            dev = classification([i % 3 for i in range(20)], range(20), spec["dev_wrong"], spec["conf"], spec.get("reverse"))
            n_test = spec.get("n_test", 10)
            test = classification([i % 3 for i in range(n_test)], range(100, 100 + n_test), spec["test_wrong"],
                                  spec["conf"], spec.get("reverse"))
        else:
            dev = test = ctc(spec["corrupt"])
        epochs = spec["epochs"]
        best = None
        for epoch in range(1, spec.get("stop_after", epochs) + 1):
            step = 0.05 if metric == "accuracy" else -0.05
            score = dev.score - (epochs - epoch) * step
            best = score if best is None else (max(best, score) if metric == "accuracy" else min(best, score))
            scores = {"train_loss": 1.0 / epoch, metric_key("dev", metric): score, "dev_loss": 0.5}
            report = TrialReport(metric, columns, epoch, scores, best_dev=best, best_epoch=epoch, over_budget=False)
            if spec.get("alpha"):  # a DARTS search's own columns
                for layer in range(len(layers)):
                    scale = spec.get("alpha_scale", 0.3)
                    logits = _np.array([0.0, epoch * (layer + 1) * scale, -epoch * 0.2])
                    probs = _np.exp(logits) / _np.exp(logits).sum()
                    for name, p in zip(("none", "lora", "bitfit"), probs):
                        report.extra[f"alpha/L{layer:02d}/{name}"] = float(p)
                report.extra["derived_placement"] = _json.dumps({"num_layers": 4, "layers": [["lora"]] * 4})
            with _tempfile.TemporaryDirectory() as tmp:
                _os.makedirs(_os.path.join(tmp, MODEL_DIR))
                with open(_os.path.join(tmp, MODEL_DIR, "placement.json"), "w") as f:
                    _json.dump(placement, f)
                final = epoch == epochs and not spec.get("alpha")
                _os.makedirs(_os.path.join(tmp, PREDICTIONS_DIR))
                if final:
                    save_predictions(_os.path.join(tmp, PREDICTIONS_DIR, predictions_file("test")), test)
                    report.final = {metric_key("test", metric): test.score, "test_loss": 0.5}
                if final or spec.get("stop_after"):
                    save_predictions(_os.path.join(tmp, PREDICTIONS_DIR, predictions_file("dev")), dev)
                with open(_os.path.join(tmp, STATE_FILE), "w") as f:
                    f.write(state_json(CheckpointState(epoch=epoch, finished=final)))
                tune.report(report.row(), checkpoint=tune.Checkpoint.from_directory(tmp))
        if spec.get("fail"):
            raise RuntimeError("injected failure after the final report")

    return _trainable


def _run(trials, storage: Path, name: str, loggers: str) -> None:
    import os

    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    callbacks = {"json": [JsonLoggerCallback()], "csv": [CSVLoggerCallback()], "none": []}[loggers]
    # only the loggers given here: Tune adds its default ones unless told not to
    previous = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    tuner = tune.Tuner(
        tune.with_resources(_make_trainable(), {"cpu": 1}),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=callbacks, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        tuner.fit()
    finally:
        if previous is None:
            os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = previous


def _experiment_yaml(root: Path, name: str, task: str) -> None:
    (root / "experiment.yaml").write_text(
        f"name: {name}\nbackbone: tiny-hubert\ndata: {{source: synth, task: {task}}}\nensemble_size: 3\n"
        "train: {epochs: 2}\n"
    )


@functools.lru_cache(maxsize=None)
def _build(kind: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=f"pefttune-analysis-{kind}-"))
    atexit.register(shutil.rmtree, base, True)
    if kind == "classification":
        # <storage>/<name> = base/ks: the search is a Ray experiment in the folder itself
        # (as `run_search` does), DARTS search and retrain are Ray experiments below it.
        root = base / "ks"
        _run(MAIN_TRIALS, base, "ks", "json")
        _run(DARTS_TRIALS, root, "darts", "csv")
        _run(RETRAIN_TRIALS, root, "darts-retrain", "none")
        _experiment_yaml(root, "ks", "ks")
    else:
        root = base / "pr"
        root.mkdir()
        _run([{**t, "task": "ctc"} for t in CTC_TRIALS], root, "search", "json")
        _experiment_yaml(root, "pr", "pr")
    return root


def classification_experiment() -> Path:
    return _build("classification")


def ctc_experiment() -> Path:
    return _build("ctc")


@pytest.fixture(scope="module")
def exp_dir(ray_session) -> Path:
    return classification_experiment()


@pytest.fixture(scope="module")
def exp(exp_dir):
    return open_results(exp_dir)


@pytest.fixture(scope="module")
def ctc_dir(ray_session) -> Path:
    return ctc_experiment()


def by_name(experiment) -> dict:
    """Crafted trial name -> TrialRecord."""
    return {t.config["trial"]["name"]: t for t in experiment.trials}


# --------------------------------------------------------------------------- store
def test_store_discovers_all_ray_experiments_and_trials(exp, exp_dir):
    assert exp.ray_experiments == [".", "darts", "darts-retrain"]
    assert len(exp.trials) == len(MAIN_TRIALS) + 2
    assert exp.metric == "accuracy" and exp.mode == "max" and exp.task == "classification"
    assert exp.name == "ks" and exp.ensemble_size == 3
    t = by_name(exp)
    assert {n: t[n].outcome for n in t} == {
        "lora": "completed", "bitfit": "completed", "sequential": "completed", "discrete": "completed",
        "hybrid": "completed", "errored": "error", "early": "stopped_early", "over": "over_budget",
        "darts": "completed", "derived": "completed",
    }
    assert t["errored"].status == "ERROR" and "injected failure" in t["errored"].error
    assert {n: t[n].kind for n in ("lora", "discrete", "hybrid", "darts", "derived")} == {
        "lora": "uniform", "discrete": "discrete", "hybrid": "hybrid", "darts": "darts", "derived": "darts-derived"}
    assert t["lora"].method == "lora" and t["discrete"].method is None
    assert t["discrete"].layers == ["lora", "none", "bitfit", "lora"]
    assert t["hybrid"].layers == ["sequential+lora"] * 4
    assert t["lora"].trainable_params == 1000 and t["lora"].epochs == 2
    assert t["derived"].experiment == "darts-retrain"
    # final checkpoints with predictions; the over-budget trial has none
    assert t["lora"].checkpoint.endswith("checkpoint_000001")
    assert set(t["lora"].prediction_files) == {"dev", "test"}
    assert t["over"].checkpoint is None and not t["over"].has_predictions
    assert set(t["early"].prediction_files) == {"dev"}
    usable = {n for n in t if t[n].usable}
    assert usable == {"lora", "bitfit", "sequential", "discrete", "hybrid", "derived"}
    assert exp.score(t["lora"], "dev") == pytest.approx(0.9) and exp.score(t["lora"], "test") == pytest.approx(0.7)


def test_store_opens_uri_and_nested_experiment_dirs(exp, exp_dir):
    uri = open_results(f"file://{exp_dir}")
    assert sorted(t.trial_id for t in uri.trials) == sorted(t.trial_id for t in exp.trials)
    assert uri.is_local
    # a single Ray experiment dir opens on its own too (experiment.yaml from the parent)
    darts = open_results(exp_dir / "darts")
    assert darts.ray_experiments == ["."] and [t.kind for t in darts.trials] == ["darts"]
    assert darts.metric == "accuracy"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_results(exp_dir / "nope")
    with pytest.raises(ValueError, match="no Ray Tune experiment"):
        open_results(exp_dir / "darts" / by_name(darts)["darts"].trial_name)


def test_store_history_sources(exp):
    t = by_name(exp)
    assert list(exp.history(t["lora"])["epoch"]) == [1, 2]  # result.json
    assert list(exp.history(t["darts"])["epoch"]) == [1, 2, 3]  # progress.csv
    assert list(exp.history(t["derived"])["epoch"]) == [2]  # loggers off: last result only


def test_top_k_and_best_per_method(exp):
    names = {t.trial_id: t.config["trial"]["name"] for t in exp.trials}
    assert [names[t.trial_id] for t in top_k(exp, 3)] == ["lora", "discrete", "bitfit"]
    assert [names[t.trial_id] for t in top_k(exp, 10)] == ["lora", "discrete", "bitfit", "derived", "sequential",
                                                           "hybrid"]
    # the errored trial (dev 1.0) and the early-stopped one (0.95) are never members
    assert [names[t.trial_id] for t in top_k(exp, 2, "trainable_params")] == ["bitfit", "discrete"]
    # any numeric column ranks; lora, bitfit, sequential and derived tie at test 0.7 and
    # ties go by trial id (Ray's ids are random, so the order among them is not fixed)
    by_test = top_k(exp, 5, "test_score", "max")
    assert {names[t.trial_id] for t in by_test[:4]} == {"lora", "bitfit", "sequential", "derived"}
    assert [t.trial_id for t in by_test[:4]] == sorted(t.trial_id for t in by_test[:4])
    assert names[by_test[4].trial_id] == "discrete"
    best = best_per_method(exp)
    assert list(best) == ["lora", "bitfit", "sequential"]
    with pytest.raises(ValueError, match="positive integer"):
        top_k(exp, 0)


def test_select_members(exp):
    t = by_name(exp)
    label, members = select_members(exp, "top-k")
    assert label == "top-3" and len(members) == 3
    label, members = select_members(exp, "per-method")
    assert label == "per-method" and [m.method for m in members] == ["lora", "bitfit", "sequential"]
    # explicit ids may name trials that are excluded by default (errored, with predictions)
    label, members = select_members(exp, f"{t['errored'].trial_id},{t['lora'].trial_id}")
    assert label == "ids" and members == [t["errored"], t["lora"]]
    with pytest.raises(MissingPredictionsError, match=f"predictions are missing for trial {t['early'].trial_id}"):
        select_members(exp, [t["early"].trial_id])
    with pytest.raises(ValueError, match="no trial"):
        select_members(exp, "nope-123")


def test_remote_experiments_copy_prediction_files(exp_dir):
    remote = open_results(exp_dir)
    remote.is_local = False  # exercise the copy-to-local path used for s3:// / gs://
    trial = by_name(remote)["lora"]
    arrays = remote.predictions(trial, "test")
    assert arrays["probs"].shape == (10, 3) and remote._cache_dir is not None
    assert not str(remote.local_file(trial.prediction_files["test"])).startswith(str(exp_dir))
    remote.close()


# --------------------------------------------------------------------------- ensembles
def test_members_align_on_example_index(exp):
    t = by_name(exp)
    data = load_members(exp, [t["lora"], t["bitfit"]], "test")
    assert data.index.tolist() == list(range(100, 110))
    assert data.labels.tolist() == TEST_Y
    # bitfit stored its rows reversed: aligned, it is wrong exactly on examples 3, 4, 5
    bitfit_pred = data.probs[1].argmax(-1)
    assert np.flatnonzero(bitfit_pred != data.labels).tolist() == [3, 4, 5]
    assert data.probs.shape == (2, 10, 3)


def test_per_method_ensembles_known_answers(exp):
    t = by_name(exp)
    run = run_ensembles(exp, "per-method")
    assert run.members == "per-method" and [m.method for m in run.trials] == ["lora", "bitfit", "sequential"]
    scores = {r.strategy: r.test_score for r in run.results}
    assert scores == {"vote": 1.0, "weighted": 1.0, "soft": 1.0, "caruana": pytest.approx(0.7)}
    assert run.member_scores[t["lora"].trial_id] == {"dev": pytest.approx(0.9), "test": pytest.approx(0.7)}
    vote = run.result("vote")
    assert vote.best_member_id == t["lora"].trial_id and vote.best_member_test == pytest.approx(0.7)
    assert vote.delta_vs_best == pytest.approx(0.3)
    assert (vote.mcnemar_b, vote.mcnemar_c, vote.mcnemar_p) == (3, 0, pytest.approx(0.25))
    # the gain's paired bootstrap interval: 3 of 10 examples better, none worse
    assert 0.0 <= vote.gain_ci_low < 0.3 < vote.gain_ci_high <= 0.7
    assert vote.row()["gain_ci_low"] == vote.gain_ci_low
    assert vote.dev_score == 1.0  # dev errors are disjoint as well
    caruana = run.result("caruana")
    assert caruana.selected == [t["lora"].trial_id]  # adding a member never strictly helps on dev
    assert caruana.dev_score == pytest.approx(0.9)
    # the same numbers as the pure functions on the aligned arrays
    data = load_members(exp, run.trials, "test")
    assert run.result("soft").test_pred == E.soft_vote(data.probs)[0].tolist()


def test_gain_interval_on_a_known_difference():
    from types import SimpleNamespace

    from pefttune.analysis.ensemble_runner import gain_interval

    rng = np.random.default_rng(0)
    member = (rng.random(20000) < 0.15).astype(np.int64)  # 15% errors
    ensemble = member.copy()
    ensemble[np.flatnonzero(member)[::3]] = 0  # a third of them fixed: gain 0.05
    gain = member.mean() - ensemble.mean()
    low, high = gain_interval(SimpleNamespace(task="classification", metric="accuracy"), ensemble, member, None)
    assert low < gain < high and high - low < 0.01 and low > 0.04
    assert gain_interval(SimpleNamespace(task="classification", metric="macro_f1"), ensemble, member, None) == (None, None)
    refs = [[1, 2, 3, 4]] * 200  # CTC: edits over reference lengths, lower is better, the gain positive
    low, high = gain_interval(SimpleNamespace(task="ctc", metric="per"), np.zeros(200), np.ones(200), refs)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_top_k_and_explicit_ensembles(exp):
    t = by_name(exp)
    run = run_ensembles(exp, "top-3", ["vote", "weighted"])
    assert [m.trial_id for m in run.trials] == [t["lora"].trial_id, t["discrete"].trial_id, t["bitfit"].trial_id]
    assert [r.strategy for r in run.results] == ["vote", "weighted"]
    assert run.result("vote").test_score == pytest.approx(0.8)  # examples 0 and 3 are out-voted
    assert run.result("weighted").test_score == pytest.approx(0.8)
    explicit = run_ensembles(exp, [t["lora"].trial_id, t["derived"].trial_id], "soft")
    # lora (conf 0.7) outweighs derived (0.6) where they disagree: lora's test score
    assert explicit.members == "ids" and explicit.result("soft").test_score == pytest.approx(0.7)
    with pytest.raises(ValueError, match="does not apply to a classification"):
        run_ensembles(exp, "top-3", ["rover"])
    with pytest.raises(ValueError, match="unknown ensemble strategy"):
        run_ensembles(exp, "top-3", ["median"])
    with pytest.raises(ValueError, match="at least 2 members"):
        run_ensembles(exp, "top-1")


def test_ctc_ensembles_known_answers(ctc_dir):
    exp = open_results(ctc_dir)
    assert exp.task == "ctc" and exp.metric == "per" and exp.mode == "min"
    run = run_ensembles(exp, "per-method")
    for trial in run.trials:
        assert run.member_scores[trial.trial_id]["test"] == pytest.approx(1 / 6)
    assert {r.strategy: r.test_score for r in run.results} == {"frame_vote": 0.0, "posterior_avg": 0.0, "rover": 0.0}
    rover = run.result("rover")
    assert rover.test_pred == [[1, 2], [3], [1, 3], [2]]
    assert rover.delta_vs_best == pytest.approx(1 / 6)  # positive = better, also for error rates
    assert 0.0 <= rover.gain_ci_low <= 1 / 6 <= rover.gain_ci_high
    with pytest.raises(ValueError, match="does not apply to a ctc"):
        run_ensembles(exp, "per-method", ["vote"])


def test_cli_ensemble_writes_json_and_table(exp_dir, tmp_path, capsys):
    from pefttune.cli import main

    out = tmp_path / "ens"
    assert main(["ensemble", str(exp_dir), "--members", "per-method", "--strategy", "vote,soft", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "members (per-method)" in text and "vote" in text and "1.0000" in text
    data = json.loads((out / "ensembles.json").read_text())
    rows = data["runs"][0]["ensembles"]
    assert [r["strategy"] for r in rows] == ["vote", "soft"] and rows[0]["test_score"] == 1.0
    assert len(data["runs"][0]["member_scores"]) == 3
    import pandas as pd

    table = pd.read_parquet(out / "ensembles.parquet")
    assert table["ensemble_id"].tolist() == ["per-method:vote", "per-method:soft"]
    assert (out / "ensembles.csv").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary files left
    assert main(["ensemble", str(exp_dir), "--members", "top-3", "--strategy", "rover"]) == 2
    assert "does not apply" in capsys.readouterr().err
