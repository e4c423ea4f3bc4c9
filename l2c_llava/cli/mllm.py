"""LLaVA-1.5 on a swapped-in encoder: ``l2c mllm pretrain|finetune|eval-vqa|eval|chat``."""

from __future__ import annotations

from pathlib import Path

from l2c_llava.cli.command import LLAVA_MODEL, Command, json_out, option, training
from l2c_llava.errors import InputError


def _mllm_run():
    from l2c_llava.mllm.train import run_mllm

    return run_mllm


def _cmd_mllm_train(args) -> int:
    if args.cfg.train.stage != args.mllm_command:
        raise InputError(
            f"{args.config}: train.stage is {args.cfg.train.stage!r}; run it with "
            f"`l2c mllm {args.cfg.train.stage}`"
        )
    return training(_mllm_run)(args)


def _cmd_eval_vqa(args) -> int:
    from l2c_llava.mllm.evaluate import evaluate_vqa

    return json_out(
        evaluate_vqa(
            args.model,
            args.questions,
            args.image_root,
            args.out or args.model,
            train_json=args.train_json,
            batch_size=args.batch_size,
            limit=args.limit,
            shuffled_images=args.shuffled_images,
        )
    )


def _cmd_mllm_eval(args) -> int:
    from l2c_llava.mllm.lmms import run_lmms_eval

    limits = {}
    for item in args.task_limit or []:
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise InputError(f"--task-limit {item!r}: use TASK=N with N >= 1")
        limits[name] = int(n)
    run_lmms_eval(
        args.model,
        [t for t in args.tasks.split(",") if t],
        args.out,
        data_dir=args.data,
        image_root=args.image_root,
        device=args.device,
        batch_size=args.batch_size,
        limit=args.limit,
        task_limits=limits,
        model=args.lmms_model,
    )
    print((Path(args.out) / "results.md").read_text(), end="")
    return 0


def _cmd_chat(args) -> int:
    from l2c_llava.mllm.chat import chat, chat_session

    if args.interactive:  # the model stays loaded: one question per line on stdin
        return chat_session(args.model, args.image, args.question, max_new_tokens=args.max_new_tokens)
    if not args.question:
        raise InputError("give a question (or --interactive)")
    print(chat(args.model, args.image, args.question, max_new_tokens=args.max_new_tokens))
    return 0


GROUPS = {  # command group -> (help, metavar of its subcommand)
    "mllm": ("LLaVA-1.5 with a swapped-in vision encoder: build, pretrain, finetune, chat", "ACTION"),
}
COMMANDS: dict[str, Command] = {
    "mllm pretrain": Command(
        "train the projector on caption pairs (plain template)", _cmd_mllm_train, config="mllm"
    ),
    "mllm finetune": Command(
        "train projector + LLM (full or LoRA) on instruction data (vicuna_v1)", _cmd_mllm_train, config="mllm"
    ),
    "mllm eval-vqa": Command(
        "short-answer accuracy on held-out questions, beside the answer prior",
        _cmd_eval_vqa,
        [
            LLAVA_MODEL,
            option("--questions", required=True, help="JSONL: question_id, image, question, answers, type"),
            option("--image-root", required=True),
            option(
                "--train-json", default=None, help="LLaVA training JSON, for the most-frequent-answer prior"
            ),
            option(
                "--out",
                default=None,
                help="folder for vqa_metrics.json / vqa_answers.jsonl (default: --model)",
            ),
            option("--batch-size", type=int, default=8),
            option("--limit", type=int, default=None, help="first N questions only"),
            option(
                "--shuffled-images",
                action="store_true",
                help="answer each question again with another question's "
                "image: the score without the right image, and the share of answers the image changed (doubles the time)",
            ),
        ],
    ),
    "mllm eval": Command(
        "lmms-eval on a LLaVA folder (batched l2c_llava, or llava_hf): paper benchmarks or the local tasks",
        _cmd_mllm_eval,
        [
            LLAVA_MODEL,
            option(
                "--tasks",
                required=True,
                help="comma-separated: local l2c_vqa,l2c_pope,l2c_caption (offline, "
                "need --data; `local` for all three) or lmms-eval names (vqav2_val,gqa,...; `paper` for the "
                "paper table's, `paper_all` with the GPT-judged ones)",
            ),
            option("--out", required=True, help="results folder (lmms_eval/ as written, results.json/.md)"),
            option("--data", default=None, help="the embedded dataset's folder (for the local tasks)"),
            option("--image-root", default=None, help="image root of the local tasks (default DATA/images)"),
            option("--device", default="cpu", help="cpu, cuda, cuda:0 ..."),
            option(
                "--lmms-model",
                default="l2c_llava",
                choices=["l2c_llava", "llava_hf"],
                help="the lmms-eval model: l2c_llava (this project's, batched) or lmms-eval's llava_hf "
                "(batch size 1 only)",
            ),
            option("--batch-size", type=int, default=8, help="questions per forward (llava_hf: 1)"),
            option("--limit", type=int, default=None, help="first N rows of each task"),
            option("--task-limit", action="append", metavar="TASK=N", help="first N rows of one local task"),
        ],
    ),
    "mllm chat": Command(
        "answer a question about an image (greedy); --interactive for many",
        _cmd_chat,
        [
            LLAVA_MODEL,
            option("--image", default=None),
            option("--max-new-tokens", type=int, default=64),
            option(
                "--interactive",
                "-i",
                action="store_true",
                help="keep the model loaded and answer one question per line "
                "of stdin (`/image PATH` changes the image, `/image` drops it; an empty line or EOF ends)",
            ),
            option("question", nargs="?", default=None),
        ],
    ),
}
