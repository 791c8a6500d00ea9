"""The package's shape: no two mindsft modules import each other, directly or in a circle; imports
only point down the layers (building blocks → models → files on disk → the loader → training,
generation → command lines); no import hides inside a function but the few that defer MindSpore;
and the converter stays free of MindSpore (its memory budget is one tensor block, MindSpore's
import alone is ~480 MB)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mindsft"


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path, modules):
    """The mindsft modules `path` imports (any import statement, also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def function_level_imports(path, modules):
    """[(line number, mindsft module)] of the imports inside a function body of `path`."""
    found = []
    for function in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from mindsft import predict` imports the module mindsft.predict, not the package.
                names = [f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules] or [node.module]
            else:
                continue
            found += [(node.lineno, name) for name in names if name in modules]
    return found


def import_graph():
    """{module: mindsft modules it imports}. A submodule naming its own package (`from
    mindsft.convert import dtypes` inside mindsft.convert) is not counted as depending on it."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in imports_of(path, files) if t != name and not name.startswith(t + ".")}
            for name, path in files.items()}


def cycles(graph):
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_two_mindsft_modules_import_each_other():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_converter_and_the_run_config_do_not_import_mindspore():
    code = ("import sys; import mindsft.convert, mindsft.convert.peft, mindsft.config, mindsft.models.families; "
            "print('mindspore' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# Lowest first. A module belongs to the layer of its longest matching prefix; every module has one,
# so a new module is placed on purpose.
LAYERS = [
    # Building blocks: errors, files, typed config pieces, formats, quantization math, kernels,
    # tokenizers and the template registry; data.schema is here because the batch's named columns
    # and IGNORE_INDEX are what the model, the data and the step share.
    ("building blocks", ["mindsft.errors", "mindsft.output_files", "mindsft.input_files", "mindsft.typed",
                         "mindsft.protowire", "mindsft.quant", "mindsft.cpu_kernels", "mindsft.metrics",
                         "mindsft.generation_config", "mindsft.tokenizer", "mindsft.templates",
                         "mindsft.data.schema"]),
    # The network and its family records: they know nothing of files.
    ("models", ["mindsft.models", "mindsft.lora_config"]),
    # Formats on disk: conversion, adapter files, data preprocessing, where a run's weights are;
    # the LoRA layer (its adapters as PEFT files).
    ("convert and data", ["mindsft.convert", "mindsft.data", "mindsft.weights", "mindsft.lora",
                          "mindsft.demo_model"]),
    # Building a network from the run config and its weights: plain, LoRA, quantized.
    ("loader", ["mindsft.config", "mindsft.loading", "mindsft.quantized_base"]),
    ("train and generation", ["mindsft.train", "mindsft.generate", "mindsft.generation_eval", "mindsft.predict",
                              "mindsft.batching", "mindsft.session"]),
    # Serving and the command lines: the terminal chat, the OpenAI-compatible server.
    ("command lines", ["mindsft.run", "mindsft.cli", "mindsft.chat", "mindsft.server", "mindsft"]),
    # The web board runs the command lines and talks through the chat session.
    ("web board", ["mindsft.board"]),
]

# The function-level imports of mindsft modules there are, each deferring MindSpore (seconds and
# ~480 MB) to the run mode that needs it, and commented so where it stands.
DEFERRED_IMPORTS = {
    ("mindsft.run", "mindsft.train.recipe"),
    ("mindsft.run", "mindsft.train.evaluate"),
    ("mindsft.run", "mindsft.predict"),
    # --help and flag errors answer before the session loads MindSpore; a board that never chats
    # starts without it.
    ("mindsft.chat", "mindsft.session"),
    ("mindsft.board.chat", "mindsft.session"),
}


def layer_of(module):
    prefixes = [(len(prefix), index) for index, (_, members) in enumerate(LAYERS) for prefix in members
                if module == prefix or module.startswith(prefix + ".")]
    assert prefixes, f"{module} is in no layer of LAYERS: place it"
    return max(prefixes)[1]


def test_imports_only_point_down_the_layers():
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in sorted(import_graph().items()) for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("mindsft.models.llama") < layer_of("mindsft.loading") < layer_of("mindsft.train.recipe")
    assert layer_of("mindsft.data.schema") < layer_of("mindsft.models.config") < layer_of("mindsft.data.packing")


def test_only_the_deferred_mindspore_imports_sit_inside_functions():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found = {}
    for name, path in files.items():
        for line, target in function_level_imports(path, files):
            found[(name, target)] = (path, line)
    assert set(found) == DEFERRED_IMPORTS
    for path, line in found.values():
        assert "# deferred: MindSpore" in path.read_text().splitlines()[line - 1], f"{path}:{line}"
