"""The package's import rules (issue 20), read from the source with ``ast`` (every import, at the top or
inside a function): recipes never import each other's training code, nothing imports the CLI, the
library never imports a recipe or an application, and the run contract (``train/``) is library that
every recipe's training drives."""

from __future__ import annotations

import ast
from pathlib import Path

import l2c_llava

PACKAGE = Path(l2c_llava.__file__).parent
RECIPES = {"stage1", "stage2", "mllm"}  # each a recipe over the library
# applications over the recipes: the command, the pipeline and its report, search, the web demo
APPS = {"cli", "__main__", "pipeline", "report", "search", "webdemo"}
TRAINING_ENTRIES = {"stage1.train", "stage2.train", "stage2.clip_baseline", "mllm.train"}
# what one stage hands the next: the trained caption encoder of stage 1 is read by stage 2
HANDED_ON = {"stage1.encoder"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__") or "__init__"
        out[name] = path
    return out


def imports(path: Path) -> set[str]:
    """The package modules a file imports (relative to l2c_llava), wherever the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n.removeprefix("l2c_llava.") for n in names if n.startswith("l2c_llava.")}
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def test_nothing_imports_the_cli():
    bad = [
        f"{m} imports {i}"
        for m, p in modules().items()
        if m != "__main__" and top(m) != "cli"
        for i in imports(p)
        if top(i) == "cli"
    ]
    assert not bad, bad


def test_the_library_imports_no_recipe_and_no_application():
    library = {m: p for m, p in modules().items() if top(m) not in RECIPES | APPS}
    assert {"losses", "layout", "models.llm", "models.vision", "io", "train.loop", "train.resume"} <= set(
        library
    )
    bad = [f"{m} imports {i}" for m, p in library.items() for i in imports(p) if top(i) in RECIPES | APPS]
    assert not bad, bad


def test_the_run_contract_is_library():
    """train/ holds what every recipe shares: recipes import it; it imports no recipe, no application
    (the CLI, the pipeline) and nothing outside the library."""
    train = {m: p for m, p in modules().items() if top(m) == "train"}
    assert {
        "train.accelerator",
        "train.checkpoints",
        "train.grad_cache",
        "train.loop",
        "train.resume",
        "train.run_dir",
        "train.schedule",
    } <= set(train)
    bad = [f"{m} imports {i}" for m, p in train.items() for i in imports(p) if top(i) in RECIPES | APPS]
    assert not bad, bad


def test_every_training_recipe_drives_the_shared_loop():
    """Stage 1 (its MNTP too), stage 2 and the CLIP baseline (through stage2/contrastive.py) and LLaVA are
    recipes (train/recipe.py) that train/loop.py's driver runs; no recipe keeps a loop of its own."""
    drivers = {"stage1.train", "stage1.mntp", "stage2.contrastive", "mllm.train"}
    found = modules()
    for m in drivers:
        assert {"train.loop.run_training", "train.recipe.Plan"} <= imports(found[m]), m
    assert "stage2.contrastive.ContrastiveRecipe" in imports(found["stage2.train"])
    assert "stage2.contrastive.ContrastiveRecipe" in imports(found["stage2.clip_baseline"])
    # what the driver owns is done by none of them
    owned = (".step()", "clip_gradients", "append_log", "micro_backward", "make_adamw", "configure_launch")
    stray = [f"{m}: {o}" for m in drivers | TRAINING_ENTRIES for o in owned if o in found[m].read_text()]
    assert not stray, stray


def test_recipes_do_not_import_each_other():
    bad = []
    for m, p in modules().items():
        if top(m) not in RECIPES:
            continue
        for i in imports(p):
            if top(i) in RECIPES and top(i) != top(m):
                if m in TRAINING_ENTRIES or not any(i == h or i.startswith(h + ".") for h in HANDED_ON):
                    bad.append(f"{m} imports {i}")
            if top(i) in APPS:
                bad.append(f"{m} imports the application {i}")
    assert not bad, bad


def test_the_rules_see_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from l2c_llava.stage2.train import x\n    import l2c_llava.cli\n")
    assert imports(f) == {"stage2.train", "stage2.train.x", "cli"}


def test_config_layers_without_a_circle():
    """config/core.py is the mechanism and knows no recipe; schemas.py and migrations.py stand on it;
    loader.py alone puts them together (the recipe registry, RECIPES, is read there)."""
    found = modules()
    above_core = {"config.schemas", "config.migrations", "config.loader"}
    assert not {i for i in imports(found["config.core"]) if top(i) == "config"}, "config.core imports config"
    assert "config.loader" not in imports(found["config.schemas"]) | imports(found["config.migrations"])
    assert "config.schemas" not in imports(found["config.migrations"])
    assert {"config.schemas.RECIPES", "config.migrations.drop_removed_keys"} <= imports(
        found["config.loader"]
    )
    assert above_core <= set(found)


def test_train_optim_builds_every_optimiser():
    """Recipes and the library ask train/optim.py's make_adamw for their optimiser; no one else builds one."""
    built = [m for m, p in modules().items() if "torch.optim.AdamW(" in p.read_text() and m != "train.optim"]
    assert not built, built
    assert "train.optim.make_adamw" in imports(modules()["train.loop"])


def test_one_owner_of_what_a_model_name_means():
    """A model name (``embedded:``, a .gguf file, a stage-2 run, a Hub id, a folder) is read by
    models/reference.py alone: the other modules ask it, none looks at the Hub or a run folder itself."""
    owned = {"models.hub.hub_snapshot", "layout.is_stage2_run", "layout.exported_tower"}
    found = modules()
    bad = [
        f"{m} imports {i}" for m, p in found.items() if m != "models.reference" for i in imports(p) & owned
    ]
    assert not bad, bad
    askers = {
        "models.llm": "llm_folder",
        "models.vision": "resolve_vision_path",
        "stage1.encoder": "resolve_model_path",
    }
    assert all(f"models.reference.{name}" in imports(found[m]) for m, name in askers.items())
    assert not {i for i in imports(found["embedded"]) if top(i) in {"models", "layout"}}


def test_one_owner_of_the_pixels():
    """LLaVA's pad to square and its image processor live in data/images.py; training's data, chat, the
    VQA eval, lmms-eval's model, the export and the health check take them from there."""
    found = modules()
    users = {
        "mllm.data": "preprocess_images",
        "mllm.chat": "pad_images",
        "mllm.evaluate": "pad_images",
        "mllm.lmms_model": "pad_images",
        "mllm.build": "llava_image_processor",
        "mllm.export": "pil_image_processor",
        "stage2.health": "llava_image_processor",
    }
    assert all(f"data.images.{name}" in imports(found[m]) for m, name in users.items())
    copies = [m for m, p in found.items() if m != "data.images" and "def expand2square" in p.read_text()]
    assert not copies, copies


def test_each_error_class_is_told_apart():
    """errors.py holds the generic errors (InputError, MissingFileError, ...); a module keeps a class of
    its own only where something tells it apart: an ``except`` or ``isinstance`` naming it, an exit code
    of its own, or the package's public API (l2c_llava.__all__)."""
    caught, defined, own_exit = set(), {}, set()
    for m, p in modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                caught |= {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                caught |= {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            elif isinstance(node, ast.ClassDef) and node.name.endswith("Error") and m != "errors":
                defined[node.name] = m
                if any(isinstance(s, ast.Assign) and "exit_code" in ast.unparse(s) for s in node.body):
                    own_exit.add(node.name)
    alone = sorted(
        f"{m}.{c}" for c, m in defined.items() if c not in caught | own_exit | set(l2c_llava.__all__)
    )
    assert not alone, (
        f"fold into l2c_llava.errors (InputError, MissingFileError, CannotRunError, ...): {alone}"
    )
