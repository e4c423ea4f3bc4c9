"""Model folders in and out: ``l2c convert weights``, ``l2c export vision|llm2clip|llava``, ``l2c import
llm2clip`` and ``l2c mllm build`` (a LLaVA assembled from a vision tower and an LLM)."""

from __future__ import annotations

import json
from pathlib import Path

from l2c_llava import layout
from l2c_llava.cli.command import OVERWRITE, Command, json_out, option
from l2c_llava.hub_push import push_if_asked


def _cmd_convert(args) -> int:
    from l2c_llava.models.convert import convert_folder

    stats = convert_folder(args.source, args.out, overwrite=args.overwrite)
    print(
        f"{stats['tensors']} tensors from {len(stats['files'])} pickled file(s) of {args.source} written as "
        f"safetensors to {args.out}"
    )
    return 0


def _cmd_export(args) -> int:
    from l2c_llava.stage2 import export

    fmt = getattr(args, "format", "hf")
    name = args.export_command if fmt == "hf" else f"vision-{fmt}"
    out = args.out or str(layout.export_dir(args.run) / name)  # the run's export.dir/vision|llm2clip
    if args.export_command == "vision":
        out = export.export_vision(args.run, out, overwrite=args.overwrite, format=fmt)
        loads = {
            "hf": "transformers CLIPVisionModel + preprocessor_config.json",
            "open_clip": f"open_clip.create_model_from_pretrained('local-dir:{out}')",
            "timm": f"timm.create_model('local-dir:{out}', pretrained=True)",
        }[fmt]
        print(f"exported the vision encoder to {out} ({loads})")
    else:
        out = export.export_llm2clip(args.run, out, text_encoder=args.text_encoder, overwrite=args.overwrite)
        print(
            f"exported the whole LLM2CLIP model to {out} (load it with "
            "l2c_llava.stage2.llm2clip.LLM2CLIP.from_pretrained)"
        )
    push_if_asked(args, out)  # --push-to-hub (hub_push.py)
    return 0


def _cmd_export_llava(args) -> int:
    from l2c_llava.errors import InputError
    from l2c_llava.mllm.export import export_hf, export_original

    if args.format == "hf":
        if args.vision_tower:
            raise InputError(
                "--vision-tower is for --format original (LLaVA's mm_vision_tower); the hf export "
                "carries its tower inside the model"
            )
        out = export_hf(args.model, args.out, overwrite=args.overwrite)
    else:
        out = export_original(args.model, args.out, overwrite=args.overwrite, vision_tower=args.vision_tower)
    print(f"exported ({args.format}) to {out}")
    if args.format == "original":
        tower = json.loads((Path(out) / "config.json").read_text())["mm_vision_tower"]
        print(
            f"mm_vision_tower: {tower} (LLaVA's loader takes it from any folder; after moving the export, "
            "run `l2c export repoint NEW_PLACE`)"
        )
        if getattr(args, "push_to_hub", None) and not tower.startswith(("openai", "laion")):
            print(
                "note: mm_vision_tower is a path on this machine: who downloads the pushed folder runs "
                "`l2c export repoint FOLDER` (or passes mm_vision_tower= to load_pretrained_model)"
            )
    push_if_asked(args, out)
    connector = json.loads((Path(out) / "config.json").read_text()).get("l2c_connector")
    if connector:
        print(
            f"note: this model uses the {connector['type']} connector ({connector['num_queries']} vision tokens); load "
            "it with l2c_llava.mllm.build.load_llava: transformers' LlavaForConditionalGeneration (and lmms-eval's "
            "llava_hf) take only the MLP connector"
        )
    return 0


def _cmd_export_repoint(args) -> int:
    from l2c_llava.mllm.export import repoint_original

    old, new = repoint_original(args.folder, vision_tower=args.vision_tower)
    print(f"{args.folder}: mm_vision_tower {old} -> {new}")
    return 0


def _cmd_import(args) -> int:
    from l2c_llava.stage2.export import import_llm2clip

    return json_out(
        import_llm2clip(args.source, args.out, text_encoder=args.text_encoder, overwrite=args.overwrite)
    )


def _cmd_mllm_build(args) -> int:
    from l2c_llava.mllm.build import build_and_save

    model, out = build_and_save(
        args.vision,
        args.llm,
        args.out,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
    )
    n = sum(p.numel() for p in model.parameters())
    print(
        f"LLaVA model ({n / 1e6:.1f}M parameters, {model.config.image_seq_length} image tokens) written to {out}"
    )
    return 0


GROUPS = {  # command group -> (help, metavar of its subcommand)
    "convert": ("convert model files (pickled .bin weights -> safetensors)", "WHAT"),
    "export": ("export trained models (vision encoder, whole LLM2CLIP model, LLaVA)", "WHAT"),
    "mllm": ("LLaVA-1.5 with a swapped-in vision encoder: build, pretrain, finetune, chat", "ACTION"),
    "import": ("bring released checkpoints in (read as data, no remote code)", "WHAT"),
}
COMMANDS: dict[str, Command] = {
    "convert weights": Command(
        "a folder or Hub id with pytorch_model*.bin (Vicuna-7B-v1.5) -> the same folder with "
        "safetensors, read with torch.load(weights_only=True)",
        _cmd_convert,
        [
            option("source", help="model folder or Hub id (lmsys/vicuna-7b-v1.5)"),
            option("out", help="output folder; point the configs' LLM (or vision) path at it"),
            option(
                "--overwrite",
                action="store_true",
                help="replace an existing OUT that is not a previous output of this command",
            ),
        ],
    ),
    "export vision": Command(
        "the stage-2 vision tower as a transformers CLIPVisionModel folder",
        _cmd_export,
        [
            option(
                "--run",
                required=True,
                help="a stage-2 run folder (or its model/ folder, or an LLM2CLIP export)",
            ),
            option(
                "--out",
                default=None,
                help="output folder (default: the run's export.dir, else <run>/export, + /vision: "
                "where the mllm configs read a stage-2 run's tower; /vision-open_clip, /vision-timm)",
            ),
            option(
                "--format",
                choices=["hf", "open_clip", "timm"],
                default="hf",
                help="hf: transformers CLIPVisionModel folder; open_clip: open_clip_config.json + "
                "open_clip_model.safetensors (open_clip.create_model_from_pretrained('local-dir:OUT')); "
                "timm: config.json + model.safetensors (timm.create_model('local-dir:OUT', pretrained=True)); "
                "the last two with LLM2CLIP's image projection (default: %(default)s)",
            ),
            OVERWRITE,
        ],
        push=True,
    ),
    "export llm2clip": Command(
        "the whole model (vision + projection + adapter + text encoder reference), release layout",
        _cmd_export,
        [
            option("--run", required=True, help="a stage-2 run folder (or its model/ folder)"),
            option(
                "--out",
                default=None,
                help="output folder (default: the run's export.dir, else <run>/export, + /llm2clip)",
            ),
            option("--text-encoder", default=None, help="record this text encoder instead of the run's"),
            OVERWRITE,
        ],
        push=True,
    ),
    "export llava": Command(
        "a trained LLaVA: transformers format (hf) or the original LLaVA format",
        _cmd_export_llava,
        [
            option("--model", required=True, help="an mllm run folder (or its model/ folder)"),
            option(
                "--out", required=True, help="output folder (original format: its name must contain 'llava')"
            ),
            option("--format", choices=["hf", "original"], default="hf"),
            option(
                "--vision-tower",
                default=None,
                metavar="ID_OR_PATH",
                help="original format: what mm_vision_tower names. Default: the released tower's Hub id "
                "when the model's tower is that release unchanged (in the local Hub cache), else the "
                "absolute path of the exported vision_tower/. A folder must hold this model's tower; a Hub "
                "id must start with openai or laion (LLaVA's loader takes no other)",
            ),
            OVERWRITE,
        ],
        push=True,
    ),
    "export repoint": Command(
        "point an original-format LLaVA export's mm_vision_tower at its own vision_tower/ after the "
        "folder moved (or at --vision-tower)",
        _cmd_export_repoint,
        [
            option("folder", help="the moved original-format export (l2c export llava --format original)"),
            option(
                "--vision-tower",
                default=None,
                metavar="ID_OR_PATH",
                help="a folder holding the same tower, or the released tower's Hub id (openai/..., laion/...) "
                "(default: the folder's own vision_tower/, absolute)",
            ),
        ],
    ),
    "import llm2clip": Command(
        "a released LLM2CLIP folder (e.g. LLM2CLIP-Openai-L-14-336) -> OUT/vision + OUT/llm2clip",
        _cmd_import,
        [
            option("source", help="the downloaded checkpoint folder"),
            option("--out", required=True, help="output folder"),
            option(
                "--text-encoder",
                default=None,
                help="the caption-contrastive LLM it pairs with (for text features)",
            ),
            OVERWRITE,
        ],
    ),
    "mllm build": Command(
        "assemble a LLaVA model from a vision encoder folder and an LLM",
        _cmd_mllm_build,
        [
            option("--vision", required=True, help="CLIPVisionModel / CLIPModel folder or Hub id"),
            option(
                "--llm",
                required=True,
                help="LLM folder, Hub id (lmsys/vicuna-7b-v1.5), .gguf file or "
                "embedded:smollm2-135m-instruct",
            ),
            option("--out", required=True),
            option(
                "--dtype",
                choices=["llm", "float32", "bfloat16", "float16"],
                default="llm",
                help="dtype of the built "
                "model, made directly in it (no float32 copy); default: the dtype the LLM's config.json names "
                "(Vicuna-7B-v1.5: float16)",
            ),
            option(
                "--allow-pickle",
                action="store_true",
                help="accept a tower saved as pytorch_model.bin (a pickle; loaded "
                "with weights_only=True); only for files from a source you trust",
            ),
            OVERWRITE,
        ],
    ),
}
