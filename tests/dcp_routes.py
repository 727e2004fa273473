"""The three ways a DCP checkpoint of an lrgrad optimizer is written and read, shared by the expert-stack
checkpoint tests: lrgrad's ``save_checkpoint``/``load_checkpoint`` ("lrgrad"), torch's
``get/set_optimizer_state_dict`` + ``dcp.save``/``dcp.load`` as Accelerate and the Trainer call them ("torch"),
and the same with the optimizer state flattened to dotted keys ("torch-flat", as torchtitan saves it)."""

from __future__ import annotations


def torch_options(route: str):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=route == "torch-flat")


def save(route: str, path: str, model, opt) -> None:
    if route == "lrgrad":
        from lrgrad.distributed import save_checkpoint

        save_checkpoint(path, model, opt)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, opt, options=torch_options(route))}, checkpoint_id=path)


def load(route: str, path: str, model, opt) -> None:
    if route == "lrgrad":
        from lrgrad.distributed import load_checkpoint

        load_checkpoint(path, model, opt)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = torch_options(route)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=options)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"], options=options)
