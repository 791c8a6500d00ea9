"""The run modes of `run_mindformer.py`: train and finetune (one recipe), eval, predict."""
from mindsft.config import RUN_MODES


def run(config):
    """Run `config.run_mode` on a loaded RunConfig; returns the mode's result mapping."""
    if config.no_effect:
        print(f"accepted for MindFormers compatibility, no effect here: {', '.join(config.no_effect)}")
    for note in config.notes:
        print(note)
    if config.run_mode in ("train", "finetune"):
        from mindsft.train.recipe import train
        return train(config)
    if config.run_mode == "eval":
        from mindsft.train.evaluate import evaluate
        return evaluate(config)
    assert config.run_mode in RUN_MODES
    from mindsft import predict
    return predict.run(config)
