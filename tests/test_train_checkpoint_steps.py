"""Mid-epoch checkpoint reports (`train.checkpoint_every_steps`) never reach Tune
(TuneEpochReportCallback; fast, no Ray cluster). The resume from such a checkpoint through
real Ray Train (2 DDP workers, one SIGKILLed): test_reliability.py -k ddp_worker_sigkill."""




class Queue(list):
    put = list.append


def test_mid_epoch_reports_are_kept_from_tune():
    from archlab.platform.train import MID_EPOCH, TuneEpochReportCallback

    cb = object.__new__(TuneEpochReportCallback)  # no Tune session here: only the queue matters
    cb._training_actor_item_queue = Queue()
    cb.after_report(None, [{MID_EPOCH: 1, "epoch": 0, "step": 5}], None)
    cb.after_report(None, [{"epoch": 1, "step": 12, "val_cosine_seed": 0.3}], None)
    assert cb._training_actor_item_queue == [{"epoch": 1, "step": 12, "val_cosine_seed": 0.3}]
