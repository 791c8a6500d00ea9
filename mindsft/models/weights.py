"""Putting named arrays into a model, with the checks that make a wrong checkpoint say so."""
import numpy as np
import mindspore as ms

from mindsft.errors import ConvertError


def assign_weights(model, arrays, source="weights", strict=True):
    """Copy {parameter name: array} into `model`'s parameters.

    Every name must be a parameter of the model with the same shape; with `strict`, every
    parameter must be given. Errors list all offending tensors at once, naming `source`.
    """
    params = {p.name: p for p in model.get_parameters()}
    unknown = sorted(set(arrays) - set(params))
    missing = sorted(set(params) - set(arrays)) if strict else []
    wrong_shape = [f"{name} {tuple(np.shape(arrays[name]))} (model expects {tuple(params[name].shape)})"
                   for name in arrays if name in params and tuple(np.shape(arrays[name])) != tuple(params[name].shape)]
    problems = []
    if unknown:
        problems.append(f"tensors the model does not have: {', '.join(unknown)}")
    if missing:
        problems.append(f"tensors missing for the model: {', '.join(missing)}")
    if wrong_shape:
        problems.append(f"shapes that disagree: {'; '.join(wrong_shape)}")
    if problems:
        raise ConvertError(f"{source}: " + " | ".join(problems))
    for name, value in arrays.items():
        param = params[name]
        if isinstance(value, ms.Tensor):
            value = value.astype(param.dtype)
        else:
            value = ms.Tensor(np.asarray(value)).astype(param.dtype)
        param.set_data(value)
