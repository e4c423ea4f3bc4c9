"""Functions of the test-only parity tasks. Imported by lmms-eval in the consumers' environment too
(transformers 4.37.2 with LLaVA's code), where l2c_llava is not installed: standard library and PIL
only. The image is handed over as it is (not square): each model pads it its own way, LLaVA's
``process_images`` from the export's ``image_aspect_ratio: pad``, l2c_llava from the folder's
``l2c_mllm.json``."""

import ast

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def answer_process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}


def loglikelihood_process_results(doc, results):
    pair = results[0]  # (log-likelihood, is greedy); lmms-eval 0.7.3's scoring gets it as its repr
    pair = ast.literal_eval(pair) if isinstance(pair, str) else pair
    return {"loglikelihood": float(pair[0])}
