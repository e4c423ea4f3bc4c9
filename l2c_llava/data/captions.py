"""Text about a scene: captions in three registers and question/answer pairs, all true of the scene.

- short caption: CC-3M-like alt-text, lowercase, about a dozen words, names the salient groups;
- alternatives: COCO-like sentences worded differently, as if by different annotators;
- dense caption: ShareGPT4V-like paragraph: every group with all its attributes, relations between
  groups, the background, counts; most exceed CLIP's 77-token window;
- questions: colour, count, shape, position, existence (present and absent objects).
"""

from __future__ import annotations

import random

from l2c_llava.data.scenes import COLOURS, PLURAL, POSITIONS, SHAPES, Group, Scene

NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
POSITION_PHRASE = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left side",
    "center": "in the center",
    "right": "on the right side",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
POSITION_ANSWERS = {
    "top left": ["top left", "upper left", "top-left"],
    "top": ["top", "top center", "top middle"],
    "top right": ["top right", "upper right", "top-right"],
    "left": ["left", "middle left", "center left"],
    "center": ["center", "middle", "centre"],
    "right": ["right", "middle right", "center right"],
    "bottom left": ["bottom left", "lower left", "bottom-left"],
    "bottom": ["bottom", "bottom center", "bottom middle"],
    "bottom right": ["bottom right", "lower right", "bottom-right"],
}
SHAPE_SYNONYMS = {
    "circle": [("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")],
    "square": [("square", "squares"), ("box", "boxes")],
    "triangle": [("triangle", "triangles")],
    "star": [("star", "stars"), ("star shape", "star shapes")],
    "hexagon": [("hexagon", "hexagons"), ("six-sided shape", "six-sided shapes")],
    "pentagon": [("pentagon", "pentagons"), ("five-sided shape", "five-sided shapes")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
}
COLOUR_SYNONYMS = {"gray": ["gray", "grey"], "purple": ["purple", "violet"], "cyan": ["cyan", "turquoise"]}
SHAPE_SIDES = {"triangle": 3, "square": 4, "diamond": 4, "pentagon": 5, "hexagon": 6, "cross": 12, "star": 10}


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def join_list(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def noun_phrase(
    g: Group,
    *,
    size: bool = False,
    style: bool = False,
    definite: bool = False,
    rng: random.Random | None = None,
) -> str:
    """'a large red circle', 'two blue squares', 'the outlined green star'... (synonyms if rng given)."""
    if rng is not None:
        singular, plural = rng.choice(SHAPE_SYNONYMS[g.shape])
        colour = rng.choice(COLOUR_SYNONYMS.get(g.colour, [g.colour]))
    else:
        singular, plural, colour = g.shape, PLURAL[g.shape], g.colour
    words = []
    if size:
        words.append(g.size)
    if style:
        words.append(g.style)
    words += [colour, singular if g.count == 1 else plural]
    body = " ".join(words)
    if definite:
        return f"the {body}" if g.count == 1 else f"the {number_word(g.count)} {body}"
    return f"{article(body)} {body}" if g.count == 1 else f"{number_word(g.count)} {body}"


def salience(g: Group) -> float:
    r = {"small": 1.0, "medium": 2.4, "large": 6.5}[g.size]
    return r * g.count


def relation(a: Group, b: Group) -> str:
    """Spatial relation of group a to group b, from their grid cells."""
    vert = "above" if a.row < b.row else "below" if a.row > b.row else ""
    horiz = "to the left of" if a.col < b.col else "to the right of" if a.col > b.col else ""
    if vert and horiz:
        return f"{vert} and {horiz}"
    return vert or horiz


def _be(g: Group) -> str:
    return "is" if g.count == 1 else "are"


def background_phrase(scene: Scene, detailed: bool) -> str:
    bg = scene.background
    if not detailed:
        return f"{bg.colour} background"
    p = bg.pattern
    if p == "gradient":
        a, b = ("top", "bottom") if bg.direction == "top" else ("left", "right")
        return f"a background that fades from {bg.colour} at the {a} to {bg.colour2} at the {b}"
    if p == "stripes":
        return f"{article(bg.colour)} {bg.colour} background with faint {bg.direction} stripes"
    if p == "checker":
        return f"{article(bg.colour)} {bg.colour} background with a subtle checkerboard pattern"
    if p == "dots":
        return f"{article(bg.colour)} {bg.colour} background sprinkled with small dots"
    if p == "grain":
        return f"a grainy, textured {bg.colour} background"
    return f"a plain {bg.colour} background"


# ---------------------------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------------------------


def short_caption(scene: Scene, rng: random.Random) -> str:
    """CC-3M-like alt-text: lowercase, no final period, about a dozen words."""
    groups = sorted(scene.groups, key=salience, reverse=True)[:3]
    parts = [noun_phrase(g, size=(g.size == "large" and rng.random() < 0.6)) for g in groups]
    listed = join_list(parts)
    bg = scene.background.colour
    templates = [
        f"{listed} on a {bg} background",
        f"{listed} against a {bg} backdrop",
        f"geometric shapes: {listed}",
        f"{listed} arranged on {bg}",
        f"simple flat illustration of {listed}",
    ]
    return rng.choice(templates)


def alternative_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """COCO-like captions worded differently, as if written by different annotators."""
    gs = list(scene.groups)
    rng.shuffle(gs)
    a, b = gs[0], gs[1]
    by_salience = sorted(scene.groups, key=salience, reverse=True)
    bg = scene.background.colour
    templates = [
        lambda: (
            f"There {_be(a)} {noun_phrase(a, rng=rng)} {POSITION_PHRASE[a.position]} and "
            f"{noun_phrase(b, rng=rng)} {POSITION_PHRASE[b.position]}."
        ),
        lambda: f"A {bg} picture with {join_list([noun_phrase(g, rng=rng) for g in scene.groups])}.",
        lambda: (
            f"{cap(noun_phrase(a, rng=rng))} {'sits' if a.count == 1 else 'sit'} {relation(a, b)} "
            f"{noun_phrase(b, rng=rng)}."
        ),
        lambda: (
            f"Several shapes, including {noun_phrase(by_salience[0], size=True, rng=rng)}, drawn on {bg}."
        ),
        lambda: (
            f"An image of {noun_phrase(a, rng=rng)} with {noun_phrase(b, rng=rng)} {POSITION_PHRASE[b.position]}."
        ),
        lambda: (
            f"{cap(POSITION_PHRASE[a.position])} there {_be(a)} {noun_phrase(a, rng=rng)}, while "
            f"{noun_phrase(b, rng=rng)} {_be(b)} {POSITION_PHRASE[b.position]}."
        ),
        lambda: (
            f"{cap(number_word(scene.total))} {'object' if scene.total == 1 else 'objects'} on a {bg} "
            f"background, the biggest being {noun_phrase(by_salience[0], rng=rng)}."
        ),
        lambda: f"A drawing showing {noun_phrase(b, rng=rng)} and {noun_phrase(a, size=True, rng=rng)}.",
    ]
    order = list(range(len(templates)))
    rng.shuffle(order)
    out: list[str] = []
    for i in order:
        text = templates[i]()
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


def dense_caption(scene: Scene, rng: random.Random) -> str:
    """ShareGPT4V-like paragraph: every group with its attributes, relations, background, counts."""
    gs = scene.groups  # reading order (sorted by cell when sampled)
    total = scene.total
    colours = sorted({g.colour for g in gs})
    opening = rng.choice(
        [
            f"The image shows {number_word(total)} flat geometric {'shape' if total == 1 else 'shapes'} "
            f"arranged on {background_phrase(scene, True)}.",
            f"This picture presents a simple composition of {number_word(total)} geometric "
            f"{'object' if total == 1 else 'objects'} placed on {background_phrase(scene, True)}.",
            f"In this image, {number_word(total)} two-dimensional {'shape is' if total == 1 else 'shapes are'} "
            f"laid out over {background_phrase(scene, True)}.",
        ]
    )
    sentences = [opening]
    for g in gs:
        desc = noun_phrase(g, size=True, style=True)
        tilt = ", tilted slightly to one side" if g.tilt else ""
        if g.count == 1:
            sentences.append(
                rng.choice(
                    [
                        f"{cap(POSITION_PHRASE[g.position])}, there is {desc}{tilt}.",
                        f"{cap(desc)} can be seen {POSITION_PHRASE[g.position]}{tilt}.",
                        f"{cap(POSITION_PHRASE[g.position])} sits {desc}{tilt}.",
                    ]
                )
            )
        else:
            sentences.append(
                rng.choice(
                    [
                        f"{cap(POSITION_PHRASE[g.position])}, {desc} are grouped closely together{tilt}.",
                        f"{cap(desc)} form a small cluster {POSITION_PHRASE[g.position]}{tilt}.",
                    ]
                )
            )
    for a, b in zip(gs, gs[1:]):
        sentences.append(
            f"{cap(noun_phrase(a, definite=True))} {_be(a)} {relation(a, b)} {noun_phrase(b, definite=True)}."
        )
    big = max(gs, key=salience)
    sentences.append(
        f"The most prominent {'element is' if big.count == 1 else 'elements are'} {noun_phrase(big, definite=True)}, "
        f"which {'draws' if big.count == 1 else 'draw'} the eye to the {big.position} of the frame."
    )
    empty = 9 - len(gs)
    sentences.append(
        f"In total there {'is' if total == 1 else 'are'} {number_word(total)} "
        f"{'object' if total == 1 else 'objects'} in {number_word(len(colours))} "
        f"{'colour' if len(colours) == 1 else 'different colours'} ({join_list(colours)}), and "
        f"{number_word(empty)} of the nine regions of the image {'is' if empty == 1 else 'are'} left empty, "
        f"which gives the composition an open, uncluttered look."
    )
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------
# questions
# ---------------------------------------------------------------------------------------------


def _qa(question: str, answer: str, qtype: str, answers: list[str] | None = None, **extra) -> dict:
    alts = [answer] + [x for x in (answers or []) if x != answer]
    return {"question": question, "answer": answer, "answers": alts, "type": qtype, **extra}


def _count_answers(n: int) -> list[str]:
    return [str(n), number_word(n)]


def _colour_answers(c: str) -> list[str]:
    return COLOUR_SYNONYMS.get(c, [c])


def scene_questions(scene: Scene, rng: random.Random, absent_pool: list[tuple[str, str]]) -> list[dict]:
    """Short-answer questions about a scene: one of each type at least, answers true by construction."""
    gs = scene.groups
    shape_counts = {s: sum(1 for g in gs if g.shape == s) for s in SHAPES}
    colour_counts = {c: sum(1 for g in gs if g.colour == c) for c in COLOURS}
    out: list[dict] = []
    g = rng.choice(gs)
    if shape_counts[g.shape] == 1:
        noun = g.shape if g.count == 1 else PLURAL[g.shape]
        out.append(
            _qa(
                f"What color {'is' if g.count == 1 else 'are'} the {noun}?",
                g.colour,
                "color",
                _colour_answers(g.colour),
            )
        )
    else:
        out.append(
            _qa(
                f"What color is the object {POSITION_PHRASE[g.position]}?",
                g.colour,
                "color",
                _colour_answers(g.colour),
            )
        )
    g = rng.choice(gs)
    out.append(
        _qa(
            f"How many {g.colour} {PLURAL[g.shape]} are there?",
            str(g.count),
            "count",
            _count_answers(g.count),
        )
    )
    out.append(
        _qa("How many objects are there in total?", str(scene.total), "count", _count_answers(scene.total))
    )
    g = rng.choice(gs)
    if colour_counts[g.colour] == 1:
        out.append(_qa(f"What shape is the {g.colour} object?", g.shape, "shape"))
    else:
        out.append(_qa(f"What shape is the object {POSITION_PHRASE[g.position]}?", g.shape, "shape"))
    g = rng.choice(gs)
    noun = f"{g.colour} {g.shape}" if g.count == 1 else f"{g.colour} {PLURAL[g.shape]}"
    out.append(_qa(f"Where {_be(g)} the {noun}?", g.position, "position", POSITION_ANSWERS[g.position]))
    g = rng.choice(gs)
    out.append(
        _qa(
            f"Is there {article(g.colour)} {g.colour} {g.shape} in the image?",
            "yes",
            "existence",
            object=f"{g.colour} {g.shape}",
        )
    )
    present = scene.present()
    absent = [p for p in absent_pool if p not in present]
    c, s = rng.choice(absent)
    out.append(_qa(f"Is there {article(c)} {c} {s} in the image?", "no", "existence", object=f"{c} {s}"))
    return out


def pope_questions(
    scene: Scene, rng: random.Random, popular: list[tuple[str, str]], n_per_category: int = 3
) -> list[dict]:
    """POPE-style yes/no probes: for each category (random, popular, adversarial), as many present
    objects (yes) as absent ones (no). Adversarial negatives share the shape or the colour of a present
    object, the analogue of POPE's co-occurring objects."""
    present = sorted(scene.present())
    out: list[dict] = []
    all_objects = [(c, s) for c in COLOURS for s in SHAPES]
    for category in ("random", "popular", "adversarial"):
        yes = rng.sample(present, min(n_per_category, len(present)))
        if category == "random":
            pool = [o for o in all_objects if o not in scene.present()]
            no = rng.sample(pool, len(yes))
        elif category == "popular":
            no = [o for o in popular if o not in scene.present()][: len(yes)]
        else:
            near = [
                (c, s)
                for c, s in all_objects
                if (c, s) not in scene.present() and any(c == pc or s == ps for pc, ps in present)
            ]
            no = rng.sample(near, min(len(yes), len(near)))
        items = [(o, "yes") for o in yes] + [(o, "no") for o in no]
        rng.shuffle(items)
        for (c, s), ans in items:
            out.append(
                {
                    "question": f"Is there {article(c)} {c} {s} in the image?",
                    "answer": ans,
                    "category": category,
                    "object": f"{c} {s}",
                }
            )
    return out


def conversational_answer(q: dict) -> str:
    """A full-sentence answer, for LLaVA conversation-style rows."""
    t, a, question = q["type"], q["answer"], q["question"]
    if t == "existence":
        obj = q["object"]
        return (
            f"Yes, there is {article(obj)} {obj} in the image."
            if a == "yes"
            else f"No, there is no {obj} in the image."
        )
    if t == "count":
        return f"There {'is' if a == '1' else 'are'} {number_word(int(a))}."
    if t == "color":
        return f"It is {a}."
    if t == "shape":
        return f"It is {article(a)} {a}."
    if t == "position":
        return f"{cap(question.split(' the ', 1)[1].rstrip('?'))} {'is' if question.startswith('Where is') else 'are'} {POSITION_PHRASE[a]}."
    return a


def text_only_conversation(rng: random.Random) -> list[tuple[str, str]]:
    """Language-only turns (like the ShareGPT rows of mix665k): shape facts, counting, arithmetic."""
    turns = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(4)
        if kind == 0:
            s = rng.choice(sorted(SHAPE_SIDES))
            n = SHAPE_SIDES[s]
            what = "points" if s == "star" else "sides"
            if s == "star":
                n = 5
            turns.append(
                (f"How many {what} does a regular {s} have?", f"A regular {s} has {number_word(n)} {what}.")
            )
        elif kind == 1:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            s1, s2 = rng.sample(SHAPES, 2)
            turns.append(
                (
                    f"If a drawing has {number_word(a)} {PLURAL[s1] if a > 1 else s1} and {number_word(b)} "
                    f"{PLURAL[s2] if b > 1 else s2}, how many shapes does it have in total?",
                    f"It has {a} + {b} = {a + b} shapes in total.",
                )
            )
        elif kind == 2:
            pos = rng.choice(list(POSITIONS.values()))
            turns.append(
                (
                    f"Where in a picture is the {pos} region?",
                    f"The {pos} region is {POSITION_PHRASE[pos]} of the picture.",
                )
            )
        else:
            words = rng.sample(SHAPES, 3)
            turns.append(
                (f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words)) + ".")
            )
    return turns


# ---------------------------------------------------------------------------------------------
# hard long captions: families told apart only after CLIP's 77 tokens
# ---------------------------------------------------------------------------------------------

# true of every image the generator draws: what a long caption may add once the scene is told
HARD_FILLERS = (
    "Every shape is drawn flat, with no shadows and no perspective.",
    "There is no text, no border and no frame anywhere in the picture.",
    "Each group of shapes keeps to its own region of an invisible three by three grid.",
)


def hard_caption_sentences(scene: Scene, late: Group, rng: random.Random) -> list[str]:
    """The opening sentences of a hard long caption, in order: true of every member of the family
    of `scene`, whose members differ only in the colour or the shape of the group `late` (its
    position, size, style and count are the same). They tell everything but that group's colour and
    shape: the total, the background, every other group with its attributes and relations, where the
    late group is, the empty regions; then remarks true of any drawn image. The generator keeps the
    fewest that fill CLIP's window and appends :func:`hard_caption_ending`."""
    others = [g for g in scene.groups if g is not late]
    total = scene.total
    sentences = [
        rng.choice(
            [
                f"The image shows {number_word(total)} flat geometric {'shape' if total == 1 else 'shapes'} "
                f"arranged on {background_phrase(scene, True)}.",
                f"This picture presents a simple composition of {number_word(total)} geometric "
                f"{'object' if total == 1 else 'objects'} placed on {background_phrase(scene, True)}.",
            ]
        )
    ]
    for g in others:
        desc = noun_phrase(g, size=True, style=True)
        tilt = ", tilted slightly to one side" if g.tilt else ""
        sentences.append(
            rng.choice(
                [
                    f"{cap(POSITION_PHRASE[g.position])}, there {_be(g)} {desc}{tilt}.",
                    f"{cap(desc)} can be seen {POSITION_PHRASE[g.position]}{tilt}.",
                ]
            )
        )
    for a, b in zip(others, others[1:]):
        sentences.append(
            f"{cap(noun_phrase(a, definite=True))} {_be(a)} {relation(a, b)} {noun_phrase(b, definite=True)}."
        )
    more = "one more object" if late.count == 1 else f"{number_word(late.count)} more objects"
    sentences.append(f"There {'is' if late.count == 1 else 'are'} {more} {POSITION_PHRASE[late.position]}.")
    taken = {g.position for g in scene.groups}
    empty = [name for name in POSITIONS.values() if name not in taken]
    if empty:
        sentences.append(
            f"The {join_list(empty)} {'region is' if len(empty) == 1 else 'regions are'} left empty."
        )
    return sentences + list(HARD_FILLERS)


def hard_caption_ending(late: Group, template: int) -> str:
    """The last sentence of a hard long caption: the late group with its colour and shape, the only
    words that differ between the members of a family (``template``: the same for all of them)."""
    desc = noun_phrase(late, size=True, style=True)
    tilt = ", tilted slightly to one side" if late.tilt else ""
    noun = late.shape if late.count == 1 else PLURAL[late.shape]
    only = f"{'it is' if late.count == 1 else 'they are'} the only {late.colour} {noun} in the picture"
    templates = [
        f"Finally, {POSITION_PHRASE[late.position]}, there {_be(late)} {desc}{tilt}; {only}.",
        f"Last of all, {desc} {'sits' if late.count == 1 else 'sit'} {POSITION_PHRASE[late.position]}{tilt}, "
        f"and {only}.",
    ]
    return templates[template % len(templates)]
