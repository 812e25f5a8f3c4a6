"""MLflow bookkeeping: flattened params, one child run per trial even across restarts."""

from archlab.platform import tracking


def test_flatten_uses_dotted_keys_and_json_for_lists():
    flat = tracking.flatten({"train": {"lr": 0.001, "epochs": 2}, "sweep": {"archs": ["lstm", "gru"]}, "x": None})
    assert flat == {"train.lr": "0.001", "train.epochs": "2", "sweep.archs": '["lstm", "gru"]', "x": "None"}


def test_restarted_trial_and_resumed_sweep_reuse_their_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "restart-test")
    assert tracking.experiment_id(c, "restart-test") == exp
    parent = tracking.parent_run(c, exp, "s-1", {"train": {"lr": 0.1}}, job_id="job-a")
    # only a resume that names the recorded run gets it back
    assert tracking.parent_run(c, exp, "s-1", {"train": {"lr": 0.1}}, job_id="job-a", run_id=parent) == parent
    params = {"arch": "lstm", "train": {"lr": 0.1}}
    first = tracking.child_run(c, exp, parent, "s-1", "abc_00001", "lstm", params)
    c.set_terminated(first, "FAILED")
    again = tracking.child_run(c, exp, parent, "s-1", "abc_00001", "lstm", params)
    assert again == first and c.get_run(again).info.status == "RUNNING"
    other = tracking.child_run(c, exp, parent, "s-1", "abc_00002", "lstm", params)
    assert other != first
    runs = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in runs) == ["trial-abc_00001", "trial-abc_00002"]
    assert c.get_run(first).data.params == {"arch": "lstm", "train.lr": "0.1"}
    # a second sweep of the same name is a new parent run
    assert tracking.parent_run(c, exp, "s-2", {}, job_id="job-b") != parent
