"""A small HH-style preference sample, written here: the layout of Anthropic's HH-RLHF, benign text.

Each row is ``{chosen, rejected}``: one multi-turn conversation in HH-RLHF's text layout
(``\\n\\nHuman: …\\n\\nAssistant: …``), the two sharing every turn but the last assistant answer, the
prompt implicit (as in HH-RLHF). The chosen answer is helpful and on topic; the rejected one is
curt, dismissive or off topic. Like the real data, rows run from a few hundred characters to
several thousand (a tenth are long: pasted notes the human asks about), answers of both sides often
start with the same words (so an implicit prompt's shared prefix runs into them), and the text has
typographic quotes, accents and the odd emoji.

``pipelines/samples/hh_style/`` holds the files this writes (``python -m pipelines.tasks.hh_style``,
seed 0): what ``pipelines/hh_rlhf.yaml`` runs on. Its measurements on the real HH-RLHF rows are in
docs/data.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "sourdough bread": ("feed the starter the night before", "a long, cool proof gives the crumb its flavour",
                        "bake it in a covered pot for the first twenty minutes"),
    "tomatoes on a balcony": ("pick a compact variety", "water deeply but not every day",
                              "six hours of sun is the minimum"),
    "a first marathon": ("build the weekly distance slowly", "one long run a week is the backbone",
                         "taper for two weeks before the race"),
    "learning Python": ("write small programs that you need", "read other people's code",
                        "learn to use the debugger early"),
    "a trip to Lisbon": ("the trams are the easiest way up the hills", "try a pastel de nata in Belém",
                         "book the Sintra palaces ahead"),
    "saving for a house": ("automate a monthly transfer", "keep an emergency fund apart",
                           "compare the total cost of each mortgage, not only the rate"),
    "sleeping better": ("keep the same wake-up time every day", "no screens in the last hour",
                        "a cool, dark room helps"),
    "a café au lait at home": ("heat the milk gently, never boil it", "use a strong, dark roast",
                               "mix coffee and milk half and half"),
    "writing a cover letter": ("open with why this role", "give one concrete result per claim",
                               "keep it under a page"),
    "houseplants in winter": ("water less often", "move them away from radiators", "wipe the dust off the leaves"),
    "teaching a child to ride a bike": ("start without pedals", "a gentle slope helps balance",
                                        "hold the shoulders, not the seat"),
    "making a résumé stand out": ("lead with results", "tailor it to each job", "cut anything older than ten years"),
}
OPENERS = ("Can you help me with {t}?", "I'd like some advice on {t}.", "What should I know about {t}?",
           "I’m new to {t}. Where do I start?", "Any tips for {t}?")
FOLLOW_UPS = ("Thanks! What's the most common mistake?", "That helps. Anything else?",
              "Great, and how long does it usually take?", "OK. Is there a “rule of thumb”?")
GOOD_STARTS = ("Sure! ", "Happy to help. ", "Good question. ", "Of course. ")
BAD = ("I don't know, look it up yourself.", "That's not really worth my time.", "Why would you even want that?",
       "Honestly, just give up on {t}.", "Let's talk about something else instead.", "No idea. Ask someone else.")
EMOJI = (" 🙂", " 👍", "", "", "", "")


def _good(rng: random.Random, topic: str, tips: tuple[str, ...], turn: int) -> str:
    a, b = rng.sample(tips, 2)
    start = rng.choice(GOOD_STARTS) if turn == 0 else "The main thing: "
    return f"{start}For {topic}, {a}. Also, {b}.{rng.choice(EMOJI)}"


def _bad(rng: random.Random, topic: str, good: str) -> str:
    bad = rng.choice(BAD).format(t=topic)
    # half the time both answers begin alike, as in HH-RLHF (the shared text runs into the answers)
    return good.split(",")[0] + ", " + bad[0].lower() + bad[1:] if rng.random() < 0.5 else bad


def _notes(rng: random.Random, topic: str, tips: tuple[str, ...]) -> str:
    """A long pasted text the human asks about (a tenth of rows): several paragraphs."""
    lines = [f"My notes on {topic}, day {d}: {rng.choice(tips)}; then {rng.choice(tips)}." for d in range(1, 60)]
    return " ".join(lines[: rng.randint(20, 58)])


def row(rng: random.Random) -> dict[str, str]:
    """One HH-style pair: an implicit prompt of 1-3 turns, then a chosen and a rejected answer."""
    topic = rng.choice(sorted(TOPICS))
    tips = TOPICS[topic]
    opener = rng.choice(OPENERS).format(t=topic)
    if rng.random() < 0.1:
        opener = f"Here are my notes: {_notes(rng, topic, tips)} What do you think?"
    text = f"\n\nHuman: {opener}"
    for turn in range(rng.randint(0, 2)):
        text += f"\n\nAssistant: {_good(rng, topic, tips, turn)}\n\nHuman: {rng.choice(FOLLOW_UPS)}"
    good = _good(rng, topic, tips, 0)
    prefix = text + "\n\nAssistant:"
    return {"chosen": f"{prefix} {good}", "rejected": f"{prefix} {_bad(rng, topic, good)}"}


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A function reward for the sample (``pipelines.tasks.hh_style:reward``): +1 per helpful opening
    or tip word of the chosen style, -1 per dismissive phrase of the rejected style, and a little for
    length up to 40 words (a random model's answers differ in it, so the scores have spread)."""
    helpful = [s.strip().rstrip(".!").lower() for s in GOOD_STARTS] + ["also", "for", "the main thing"]
    dismissive = ["look it up", "not really worth", "give up", "something else", "no idea", "why would you"]
    out = []
    for response in responses:
        text = response.lower()
        score = sum(text.count(w) for w in helpful) - sum(text.count(w) for w in dismissive)
        out.append(float(score) + min(len(text.split()), 40) / 40)
    return out


def write_sample(out_dir: str | Path, *, train_rows: int = 400, eval_rows: int = 80, seed: int = 0) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, n in (("train", train_rows), ("eval", eval_rows)):
        rows = [row(rng) for _ in range(n)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")


if __name__ == "__main__":
    write_sample(Path(__file__).resolve().parents[1] / "samples" / "hh_style")
