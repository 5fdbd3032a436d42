"""make report over a store whose runs are made here with known numbers: the rows, the seed
grouping, the Pareto frontier, both pictures, the sweep's artifacts, and the errors."""
import csv

import mlflow
import pytest
from PIL import Image

from fastclip.report import FILES, main
from fastclip.report.plots import against, pareto_frontier
from fastclip.report.runs import ReportError, RunRecord, select_runs
from fastclip.report.table import group_by_seed, markdown, write_csv

# boundary -> (image GFLOPs, zero-shot top-1 for seed 0, seed 1)
KNOWN = {"none": (1.0, 0.50, 0.60), "fixed": (0.40, 0.48, 0.52), "gumbel": (0.45, 0.40, 0.44)}


def log_run(client, exp_id, boundary, seed, gflops, top1, parent=None, status="FINISHED", old=False):
    """As training logs: val/zeroshot_top1 per epoch, zeroshot/top1 (test split) once at the end;
    old=True: a run from before the validation split, zeroshot/top1 per epoch and no val/ twin."""
    tags = {"mlflow.parentRunId": parent} if parent else {}
    run = client.create_run(exp_id, run_name=f"boundary={boundary} seed={seed}", tags=tags)
    rid = run.info.run_id
    params = {"task.name": "clip", "dataset.name": "digits", "encoder.name": "vit_tiny", "boundary.name": boundary,
              "compression.name": "none", "epochs": "15", "trainer.max_steps": "60", "seed": str(seed),
              "tracking.run_name": f"r{seed}{boundary}", "model.params_total": "250000",
              "boundary.k": "4" if boundary == "fixed" else "None"}  # decided by the option: not in the label
    for k, v in params.items():
        client.log_param(rid, k, v)
    for step in (10, 20, 30):
        client.log_metric(rid, "train/loss", 3.0 - step / 20, step=step)
        if not old:  # the objective alone, and a learned tower's boundary losses (clip_objective's parts)
            client.log_metric(rid, "train/contrastive_loss", 2.0 - step / 20, step=step)
        if boundary == "gumbel":
            client.log_metric(rid, "train/boundary_loss_image", 14.0, step=step)
    if old:
        client.log_metric(rid, "zeroshot/top1", top1 - 0.1, step=30)
    else:
        for step in (20, 40):
            client.log_metric(rid, "val/zeroshot_top1", top1 - 0.2 + step / 200, step=step)
    client.log_metric(rid, "zeroshot/top1", top1, step=60)
    if not old:
        client.log_metric(rid, "zeroshot/classes", 10.0, step=60)  # digits: chance is 0.1
    client.log_metric(rid, "efficiency/image_gflops", gflops, step=60)
    if not old:  # counted training compute, logged with train/loss (loop/compute.py)
        for step in (10, 20, 30, 40, 60):
            client.log_metric(rid, "efficiency/train_pflops_total", step * gflops / 100, step=step)
        client.log_metric(rid, "efficiency/train_gflops", 3 * gflops, step=60)
        client.log_metric(rid, "train/samples", 2e5, step=60)  # 60 steps' compute over them: 3 x gflops a sample
    client.set_terminated(rid, status)
    return rid


@pytest.fixture
def sweep_store(tmp_path):
    """Experiment demo: an older run outside any sweep, then a sweep of 3 boundaries x 2 seeds plus
    one FAILED job."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("demo", artifact_location=(tmp_path / "artifacts").as_uri())
    log_run(client, exp, "none", 7, 1.0, 0.99, old=True)  # not the sweep's: must not show in its report
    parent = client.create_run(exp, run_name="sweep boundary=none,fixed,gumbel seed=0,1",
                               tags={"fastclip.role": "sweep", "fastclip.sweep_dir": str(tmp_path / "2026-11-30" / "10-00-00")})
    pid = parent.info.run_id
    for boundary, (gflops, *tops) in KNOWN.items():
        for seed, top1 in enumerate(tops):
            log_run(client, exp, boundary, seed, gflops, top1, parent=pid)
    log_run(client, exp, "fixed", 2, 0.4, 0.0, parent=pid, status="FAILED")
    client.set_terminated(pid)
    return uri, client, pid


def test_a_sweep_report_groups_seeds_marks_the_frontier_and_logs_to_the_parent(sweep_store, tmp_path, capsys):
    uri, client, pid = sweep_store
    out = tmp_path / "report"
    report = main(["--experiment", "demo", "--sweep", "latest", "--uri", uri, "--out", str(out)])
    assert report.selection.sweep_id == pid and report.selection.left_out == {"FAILED": 1}
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| boundary=")]
    assert len(rows) == 3  # one per group, the run outside the sweep and the FAILED job left out
    by_label = {row.split(" | ")[0][2:]: row for row in rows}
    none = by_label["boundary=none"]
    stated = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("Same in every"))
    assert "seeds 0,1;" in stated and "dataset digits;" in stated  # constant columns: said once, above
    assert none.startswith("| boundary=none | 2 |")  # n, right after the label (no boundary column repeating it)
    assert "| 0.5500 ± 0.0707 |" in none  # mean ± sample std of 0.50 and 0.60
    assert "| 0.5000 ± 0.0283 |" in by_label["boundary=fixed"] and "| 0.4 ± 0 |" in by_label["boundary=fixed"]
    assert "| 0.25 ± 0 |" in none  # params (M): a measure stays a column even where equal
    # fixed is cheaper and better than gumbel: gumbel is off the frontier
    assert [g.label for g in report.frontier] == ["boundary=fixed", "boundary=none"]
    assert "frontier" in report.text and "Not shown: 1 FAILED" in report.text
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and {r["seed"] for r in table} == {"0", "1"}
    assert sorted(float(r["zeroshot/top1"]) for r in table if r["boundary"] == "gumbel") == [0.40, 0.44]
    for name in ("pareto.png", "curves.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 400
    logged = {a.path for a in client.list_artifacts(pid, "report")}
    assert logged == {f"report/{f}" for f in FILES}
    assert str(out / "report.md") in capsys.readouterr().out
    # the curves' data: each run's history, by step
    gumbel0 = next(r for g in report.groups if g.label == "boundary=gumbel" for r in g.runs if r.params["seed"] == "0")
    assert gumbel0.history["val/zeroshot_top1"] == [(20, pytest.approx(0.30)), (40, pytest.approx(0.40))]
    assert gumbel0.history["train/loss"] == [(10, 2.5), (20, 2.0), (30, 1.5)]
    # the metric's curve is its per-epoch validation twin (zeroshot/top1 is one test-split point at the end);
    # the objective (contrastive loss, not train/loss with the weighted boundary loss in it) and the
    # boundary loss (logged by the gumbel runs only) each in their own panel
    loss, boundary, top1 = report.curves
    assert loss.label == "train/contrastive_loss" and set(loss.plotted.values()) == {"train/contrastive_loss"}
    assert boundary.label == "train/boundary_loss_image" and len(boundary.plotted) == 2
    assert top1.label == "val/zeroshot_top1"
    assert set(top1.plotted.values()) == {"val/zeroshot_top1"} and len(top1.plotted) == 6
    assert report.chance == pytest.approx(0.1)  # top-1 over the 10 digit classes: the dashed line's level


def test_curves_against_counted_training_compute_and_the_whole_models_training_cost(sweep_store, tmp_path):
    """--x compute: each run's validation curve against its efficiency/train_pflops_total at the same
    steps (runs compared at equal compute); a run that never counted it is left out of that panel.
    --cost efficiency/train_gflops_mean: the Pareto axis is the whole model's training cost a sample over
    the run, its compute over its samples where a run (these, older) did not log it."""
    uri, _, _ = sweep_store
    report = main(["--experiment", "demo", "--uri", uri, "--out", str(tmp_path / "compute"), "--x", "compute",
                   "--cost", "efficiency/train_gflops_mean"])
    assert {g.label: g.stat("efficiency/train_gflops_mean")[0] for g in report.groups} == pytest.approx(
        {f"boundary={b}": 3 * KNOWN[b][0] for b in ("none", "fixed", "gumbel")})
    top1 = report.curves[-1]
    assert len(top1.plotted) == 6 and len(report.selection.runs) == 7  # the old run has no compute history
    gumbel0 = next(r for g in report.groups if g.label == "boundary=gumbel" for r in g.runs if r.params["seed"] == "0")
    gflops = KNOWN["gumbel"][0]
    assert against(gumbel0.history["val/zeroshot_top1"], gumbel0.history["efficiency/train_pflops_total"]) == [
        (pytest.approx(20 * gflops / 100), pytest.approx(0.30)), (pytest.approx(40 * gflops / 100), pytest.approx(0.40))]
    assert [g.label for g in report.frontier] == ["boundary=fixed", "boundary=none"]


def test_a_number_logged_as_an_int_or_a_float_is_one_value_to_the_report():
    """A float key logged as 1 (before the config was typed) and as 1.0 (after) is the same choice."""
    from fastclip.report.runs import canonical
    assert canonical({"trainer.lr": "1", "b": "1.0", "c": "5e-4", "d": "0.0005", "e": "vit_tiny", "f": "None",
                      "g": "[1, 1]"}) == {"trainer.lr": "1", "b": "1", "c": "0.0005", "d": "0.0005", "e": "vit_tiny",
                                          "f": "None", "g": "[1, 1]"}


def test_a_curve_against_another_metric_takes_its_value_at_or_before_each_step():
    assert against([(5, 1.0), (10, 2.0), (25, 3.0)], [(10, 0.1), (20, 0.2)]) == [(0.1, 2.0), (0.2, 3.0)]
    assert against([(5, 1.0)], []) == []


def test_without_a_sweep_the_report_covers_the_experiments_finished_runs(sweep_store, tmp_path):
    uri, client, _ = sweep_store
    report = main(["--experiment", "demo", "--uri", uri, "--out", str(tmp_path / "all")])
    assert len(report.selection.runs) == 7 and report.selection.sweep_id is None
    assert {g.label for g in report.groups} == {"boundary=none", "boundary=fixed", "boundary=gumbel"}
    assert [len(g.runs) for g in report.groups if g.label == "boundary=none"] == [3]  # seeds 7, 0, 1
    # the old run has no val/ twin: its curve is the metric itself, and the panel's label says so
    old = next(r for r in report.selection.runs if r.params["seed"] == "7")
    loss, top1 = report.curves[0], report.curves[-1]
    assert loss.plotted[old.run_id] == "train/loss"  # an older run without the objective alone: its total loss
    assert loss.label == "train/contrastive_loss (train/loss where a run has no train/contrastive_loss)"
    assert top1.plotted[old.run_id] == "zeroshot/top1"
    assert old.history["zeroshot/top1"] == [(30, pytest.approx(0.89)), (60, 0.99)]
    assert sorted(top1.plotted.values()).count("val/zeroshot_top1") == 6
    assert top1.label == "val/zeroshot_top1 (zeroshot/top1 where a run has no val/zeroshot_top1)"


def record(name, metrics=None, **params):
    return RunRecord(name, name, {k.replace("__", "."): str(v) for k, v in params.items()}, metrics or {}, {}, 0)


def test_labels_name_options_and_the_csv_names_each_column_once(tmp_path):
    """A swept encoder= decides its nested keys (not in the label); a swept epochs is one CSV column;
    runtime keys (workers) never split a seed group; a metric some runs lack shows its own n."""
    runs = [record(f"r{seed}{enc}", {"zeroshot/top1": top1}, encoder__name=enc, encoder__vision__width=width,
                   epochs=epochs, seed=seed, trainer__num_workers=seed)
            for enc, width, epochs in (("vit_tiny", 96, 5), ("vit_s", 384, 10))
            for seed, top1 in ((0, 0.5), (1, float("nan")))]
    groups = group_by_seed(runs)
    assert [g.label for g in groups] == ["encoder=vit_tiny epochs=5", "encoder=vit_s epochs=10"]
    assert all(len(g.runs) == 2 for g in groups)
    assert "| 0.5000 (n=1) |" in markdown(groups)  # the NaN seed is not counted as agreeing
    write_csv(groups, tmp_path / "r.csv")
    header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert len(header) == len(set(header)) and header.count("epochs") == 1 and "encoder.vision.width" not in header


def test_what_an_option_sets_beyond_its_label_is_said_under_the_table():
    """boundary=unigram runs the byte text tower (text_tokens=bytes) and pools the text alone: its row's
    label said neither, so it read as the BPE rows' peer. A shared key an option sets apart is named under
    the table; boundary=none's apply_to=[] is not (it pools nothing: placement_unread)."""
    from fastclip.report.table import set_by_options
    placement = {"none": ("[]", "bpe"), "fixed": ("['image', 'text']", "bpe"), "gumbel": ("['image', 'text']", "bpe"),
                 "unigram": ("['text']", "bytes")}
    weight = {"none": None, "fixed": 0.0, "gumbel": 4.0, "unigram": 1.0}  # an option's own loss weight: its name says it
    runs = [record(f"r{name}", {"zeroshot/top1": 0.5}, boundary__name=name, boundary__apply_to=towers,
                   boundary__text_tokens=tokens, seed=0, **({"boundary__k": 4} if name == "fixed" else {}),
                   **({"boundary__loss_weight": weight[name]} if weight[name] is not None else {}))
            for name, (towers, tokens) in placement.items()]  # fixed's own k: absent from the other runs
    assert set_by_options(runs) == ["boundary.apply_to: ['image', 'text'] (boundary=fixed, gumbel), ['text'] "
                                    "(boundary=unigram)",
                                    "boundary.text_tokens: bpe (boundary=fixed, gumbel), bytes (boundary=unigram)"]
    assert markdown(group_by_seed(runs)).endswith("Set by an option beyond its label: " + "; ".join(set_by_options(runs))
                                                  + ".")
    assert set_by_options(runs[:3]) == []  # none, fixed, gumbel: every pooling option on both towers, over BPE
    # a run from a store whose params lack the option (logged by hand) is left out, not a crash
    assert set_by_options([*runs, record("bare", {"zeroshot/top1": 0.5}, boundary__text_tokens="bpe", seed=0)]) == \
        set_by_options(runs)


def test_the_frontier_of_a_hand_made_case():
    points = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.65), (0.5, 0.2), (1.0, 0.5)]
    # (2, 0.6) and (3, 0.65) are dominated by (2, 0.7); the two equal points dominate neither
    assert pareto_frontier(points) == [4, 0, 5, 1]
    # BPC: lower is better, so the cheapest lowest wins
    assert pareto_frontier([(1.0, 1.5), (2.0, 1.2), (3.0, 1.3)], lower_better=True) == [0, 1]


def test_make_reports_default_finds_the_newest_sweep_in_any_experiment(sweep_store, tmp_path):
    """`make sweep` logs to the sweep's own experiment (boundary_ablation); `make report` (--sweep latest,
    no --experiment) reports it, not the default experiment's runs."""
    uri, client, pid = sweep_store
    client.create_experiment("fastclip", artifact_location=(tmp_path / "f").as_uri())
    report = main(["--sweep", "latest", "--uri", uri, "--out", str(tmp_path / "r")])
    assert report.selection.experiment == "demo" and report.selection.sweep_id == pid
    plain = main(["--uri", uri, "--out", str(tmp_path / "p")])  # python -m fastclip.report, no options: the same
    assert plain.selection.experiment == "demo" and plain.selection.sweep_id == pid


def test_a_plain_report_of_a_store_without_a_sweep_covers_the_fastclip_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("fastclip", artifact_location=(tmp_path / "a").as_uri())
    log_run(client, exp, "none", 0, 1.0, 0.5)
    report = main(["--uri", uri, "--out", str(tmp_path / "r")])
    assert report.selection.experiment == "fastclip" and report.selection.sweep_id is None
    assert len(report.groups) == 1


def test_a_char_lm_sweeps_report_takes_its_bits_per_character_against_its_training_cost(tmp_path):
    """`make report` after a task=lm sweep (and the line such a sweep prints) failed on the CLIP defaults,
    zeroshot/top1 and image GFLOPs, which a char LM never logs: the defaults are the runs' headline and cost."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("lm", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(exp, run_name="sweep", tags={"fastclip.role": "sweep"}).info.run_id
    for boundary, bpc, gflops in (("none", 2.1, 0.30), ("gumbel", 2.0, 0.12)):
        rid = client.create_run(exp, run_name=boundary, tags={"mlflow.parentRunId": parent}).info.run_id
        for k, v in {"task.name": "lm", "boundary.name": boundary, "seed": "0"}.items():
            client.log_param(rid, k, v)
        client.log_metric(rid, "train/bpc", bpc + 1, step=10)
        client.log_metric(rid, "lm/test_bpc", bpc, step=20)
        client.log_metric(rid, "efficiency/train_gflops_mean", gflops, step=20)
        client.set_terminated(rid)
    client.set_terminated(parent)
    report = main(["--uri", uri, "--out", str(tmp_path / "r")])
    assert "Pareto frontier of lm/test_bpc against efficiency/train_gflops_mean" in report.text
    assert [g.label for g in report.frontier] == ["boundary=gumbel"]  # lower bpc at a lower cost
    with pytest.raises(SystemExit, match=r"--cost: no run logged any of \['efficiency/image_gflops', 'efficiency/"
                                         r"train_gflops_mean'\]; name one they logged \(\['lm/test_bpc', 'train/bpc'\]"):
        client.delete_experiment(exp)
        other = client.create_experiment("bare", artifact_location=(tmp_path / "b").as_uri())
        rid = client.create_run(other).info.run_id
        client.log_metric(rid, "lm/test_bpc", 2.0)
        client.log_metric(rid, "train/bpc", 3.0)
        client.set_terminated(rid)
        main(["--uri", uri, "--experiment", "bare", "--out", str(tmp_path / "r2")])


def test_report_errors_name_what_is_missing(sweep_store, tmp_path):
    uri, client, _ = sweep_store
    with pytest.raises(ReportError, match="'nope'.*it has.*demo"):
        select_runs(uri, "nope")
    with pytest.raises(ReportError, match="--sweep 123: not a sweep parent run"):
        select_runs(uri, "demo", "123")
    client.create_experiment("plain")
    with pytest.raises(ReportError, match="has no sweep.*the newest sweep is in experiment 'demo'.*--sweep all"):
        select_runs(uri, "plain", "latest")
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    mlflow.MlflowClient(tracking_uri=empty).create_experiment("plain", artifact_location=(tmp_path / "e").as_uri())
    with pytest.raises(SystemExit, match="no sweep .a `-m` run. in"):
        main(["--sweep", "latest", "--uri", empty, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--cost efficiency/imag_gflops: no run logged it"):
        main(["--experiment", "demo", "--uri", uri, "--cost", "efficiency/imag_gflops", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--metric lm/test_bpc: no run logged it"):
        main(["--experiment", "demo", "--uri", uri, "--metric", "lm/test_bpc", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no MLflow store at"):
        main(["--uri", f"sqlite:///{tmp_path / 'none.db'}"])


def test_a_resumed_run_is_reported_as_it_ended_from_the_store_alone(tmp_path, store):
    """Seeds 0 and 1 train 2 steps at lr 5e-4; seed 0 is then resumed to 4 steps at 1e-3. MLflow keeps
    seed 0's first params (max_steps 2): the report shows what was in effect (4 steps, 1e-3) and does
    not pool it with seed 1's 2 steps, nor with a run trained 4 steps at 1e-3 from the start (its
    schedule was 2 steps' up to the resume). Read with the run dirs and artifacts gone: the store alone."""
    import shutil

    from conftest import TINY_CLIP, compose_cfg
    from fastclip.train import run
    common = TINY_CLIP + [f"tracking.uri={store}", "trainer.batch_size=256", "epochs=1", "eval.boundary_picture=false"]
    first = {seed: run(compose_cfg(common + [f"seed={seed}", "trainer.max_steps=2", "trainer.lr=5e-4"]),
                       tmp_path / f"s{seed}")["mlflow_run_id"] for seed in (0, 1)}
    run(compose_cfg(common + ["seed=2", "trainer.max_steps=4", "trainer.lr=1e-3"]), tmp_path / "s2")
    changes = [f"trainer.resume={tmp_path / 's0' / 'checkpoints' / 'last.pt'}", "trainer.max_steps=4", "trainer.lr=1e-3"]
    assert run(compose_cfg(common + changes), tmp_path / "resume", overrides=changes)["mlflow_run_id"] == first[0]
    client = mlflow.MlflowClient(tracking_uri=store)
    logged = client.get_run(first[0]).data
    assert logged.params["trainer.max_steps"] == "2" and logged.params["trainer.lr"] == "0.0005"  # immutable
    assert logged.tags["fastclip.effective.trainer.max_steps"] == "4"
    assert logged.tags["fastclip.resume.1.git_dirty"] in ("True", "False")
    for path in tmp_path.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
    report = main(["--experiment", "fastclip", "--uri", store, "--out", str(tmp_path / "report")])
    by_seeds = {tuple(g.seeds): g for g in report.groups}
    assert set(by_seeds) == {("0",), ("1",), ("2",)}
    resumed = by_seeds[("0",)]
    assert resumed.runs[0].params["trainer.max_steps"] == "4" and resumed.runs[0].params["trainer.lr"] == "0.001"
    assert resumed.label == ("trainer.lr=0.001 trainer.max_steps=4 (resumed at step 2: trainer.lr 0.0005 -> 0.001, "
                             "trainer.max_steps 2 -> 4)")
    assert by_seeds[("2",)].label == "trainer.lr=0.001 trainer.max_steps=4"
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in report.text.splitlines()
            if line.startswith("| trainer.lr=")}
    header = next(line for line in report.text.splitlines() if line.startswith("| runs"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert resumed.label in rows  # its row's label gives the values in effect (4, 0.001) ...
    assert "max_steps" not in columns and "lr" not in columns  # ... so no column repeats them
    with open(tmp_path / "report" / "report.csv") as f:
        table = {r["seed"]: r for r in csv.DictReader(f)}
    assert (table["0"]["max_steps"], table["0"]["lr"]) == ("4", "0.001")
    assert (table["1"]["max_steps"], table["1"]["lr"]) == ("2", "0.0005")


def test_runs_of_different_code_versions_are_different_groups_unless_pooled(tmp_path):
    """The same config on two commits (the retired and the current ToMe split, say), and on the
    second commit's checkout with uncommitted changes: three groups, each labelled with its code;
    --pool-versions pools them, and the code column says how many versions a group pools."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("demo", artifact_location=(tmp_path / "artifacts").as_uri())
    old, new = "a" * 40, "b" * 40
    for (commit, dirty), tops in {(old, "False"): (0.53, 0.52), (new, "False"): (0.50, 0.51),
                                  (new, "True"): (0.40,)}.items():
        for seed, top1 in enumerate(tops):
            rid = log_run(client, exp, "tome", seed, 0.4, top1)
            client.set_tag(rid, "mlflow.source.git.commit", commit)
            client.set_tag(rid, "fastclip.git_dirty", dirty)
    # begun on the old commit, resumed (changing nothing) on the new: a version of its own
    rid = log_run(client, exp, "tome", 0, 0.4, 0.45)
    for key, value in {"mlflow.source.git.commit": old, "fastclip.git_dirty": "False", "fastclip.resumes": "1",
                       "fastclip.resume.1.git_commit": new, "fastclip.resume.1.git_dirty": "False",
                       "fastclip.resume.1.from_step": "30", "fastclip.resume.1.changes": "nothing changed"}.items():
        client.set_tag(rid, key, value)
    report = main(["--experiment", "demo", "--uri", uri, "--out", str(tmp_path / "split")])
    assert [(g.label, g.seeds) for g in report.groups] == [
        ("code=aaaaaaa", ["0", "1"]), ("code=bbbbbbb", ["0", "1"]), ("code=bbbbbbb+dirty", ["0"]),
        ("code=aaaaaaa -> bbbbbbb", ["0"])]
    assert "| 0.5250 ± 0.0071 |" in report.text and "| 0.5050 ± 0.0071 |" in report.text
    pooled = main(["--experiment", "demo", "--uri", uri, "--out", str(tmp_path / "pooled"), "--pool-versions"])
    (group,) = pooled.groups
    assert len(group.runs) == 6 and group.label == "all runs"
    assert "| pooled 4 versions: aaaaaaa; bbbbbbb; bbbbbbb+dirty; aaaaaaa -> bbbbbbb |" in pooled.text
    with open(tmp_path / "pooled" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["code"], r["git_commit"], r["git_dirty"]) for r in table][-2:] == [
        ("bbbbbbb+dirty", new, "True"), ("aaaaaaa -> bbbbbbb", f"{old} -> {new}", "False")]


def test_a_param_logged_again_with_another_value_keeps_the_value_in_effect(store):
    """MLflow refuses to change a param: a resumed part's values go into fastclip.effective.<key>,
    which follows every later part (back to the first value included)."""
    from fastclip.report.runs import effective_params
    from fastclip.tracking import Tracker
    first = Tracker(store, "demo")
    first.log_params({"trainer.max_steps": "2", "trainer.lr": "0.0005"})
    seen = []
    for max_steps in ("4", "2"):
        part = Tracker(store, "demo", run_id=first.run_id)
        part.log_params({"trainer.max_steps": max_steps, "trainer.lr": "0.0005", "eval.every_epochs": "5"})
        data = part.client.get_run(first.run_id).data
        seen.append((data.params["trainer.max_steps"], effective_params(data.params, data.tags)))
    assert seen == [("2", {"trainer.max_steps": "4", "trainer.lr": "0.0005", "eval.every_epochs": "5"}),
                    ("2", {"trainer.max_steps": "2", "trainer.lr": "0.0005", "eval.every_epochs": "5"})]
    assert "fastclip.effective.trainer.lr" not in data.tags  # never changed


def test_a_run_resumed_before_resumes_recorded_their_values_is_read_from_its_changes_text():
    """Runs resumed by an older fastclip have only fastclip.resume.<n>.changes ("k: a -> b; ..."):
    read from it, they show what was in effect and keep what the resume changed in their label (a
    resume that changed only how the run executed, workers, is no change of what it is)."""
    from fastclip.report.runs import effective_params
    first = {"trainer.max_steps": "2", "trainer.lr": "0.0005", "trainer.num_workers": "0", "seed": "0"}
    tags = {"fastclip.resumes": "2", "fastclip.resume.1.from_step": "2",
            "fastclip.resume.1.changes": "trainer.lr: 0.0005 -> 0.001; trainer.max_steps: 2 -> 4",
            "fastclip.resume.2.from_step": "3", "fastclip.resume.2.changes": "trainer.num_workers: 0 -> 2"}
    old = RunRecord("old", "old", effective_params(first, tags), {}, tags, 0, first_params=first)
    straight = record("new", trainer__max_steps=4, trainer__lr=0.001, trainer__num_workers=0, seed=1)
    assert old.params == {**first, "trainer.max_steps": "4", "trainer.lr": "0.001", "trainer.num_workers": "2"}
    assert [g.label for g in group_by_seed([old, straight])] == [
        "(resumed at step 2: trainer.lr 0.0005 -> 0.001, trainer.max_steps 2 -> 4)", "not resumed"]


class _Point:
    """What pareto_plot reads of a group: its label and (mean, std, n) of a metric."""
    def __init__(self, label, cost, top1):
        self.label, self.values = label, {"cost": cost, "top1": top1}

    def stat(self, name):
        return (self.values[name], 0.0, 1)


@pytest.mark.parametrize("points, entry", [
    ([("a", 1.0, 0.5), ("b", 2.0, 0.4)], "Pareto-optimal (the only point on the frontier)"),
    ([("a", 1.0, 0.4), ("b", 2.0, 0.5)], "Pareto frontier"),
])
def test_the_pareto_legend_shows_a_line_only_where_the_frontier_has_one(tmp_path, monkeypatch, points, entry):
    """One optimal point draws no staircase, so the legend names a point there, not a frontier line."""
    from fastclip.report import plots
    shown = []
    monkeypatch.setattr(plots.plt, "close", shown.append)  # keep the figure to read its legend
    plots.pareto_plot([_Point(*p) for p in points], "top1", "cost", tmp_path / "p.png", "t", chance=0.1)
    [fig] = shown
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [entry, "chance (0.1)"]
