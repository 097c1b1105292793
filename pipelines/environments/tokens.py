"""Exact tokens for multi-turn rollouts: a conversation's token ids are built turn by turn and never
re-rendered.

A trajectory starts as the chat template's rendering of the environment's first messages (with the
generation prompt). Each policy turn appends the token ids the engine sampled, ending at the
template's end-of-turn token (the tokenizer's EOS). The environment's answer is appended as the
text the template adds after that turn: what the template writes after the EOS (ChatML: a newline),
then the new messages, then the next generation prompt; only that new text is tokenized. So the
trainer sees exactly the tokens the sampler emitted (``loss_mask`` 1, with the sampler's
log-probs) and the environment's tokens (``loss_mask`` 0), with no decode → encode round trip.

That is exact only when the template is **append-only** for the messages the environment returns:
the rendering of a conversation must start with the rendering of every shorter one, and tokenizing
the pieces separately must give the tokens of the whole. ``check_append_only`` proves it on a
probe conversation before any actor starts; a template that strips or rewrites earlier turns
(some strip reasoning from earlier assistant turns) fails there, naming the first token that
differs.
"""

from __future__ import annotations

from typing import Any

from pipelines.data.tokens import encode_prompts
from pipelines.environments.base import Message
from pipelines.errors import ConfigError

_MARK = "\x00assistant-turn\x00"


class ChatTokens:
    """The token ids a trajectory grows by, under one tokenizer's chat template and tool schemas."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None = None, where: str = "policy") -> None:
        self.tokenizer, self.tools, self.where = tokenizer, tools or None, where
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{where}: the tokenizer has no chat template; an environment's conversations need one")
        eos = tokenizer.eos_token
        if eos is None:
            raise ConfigError(f"{where}: the tokenizer has no EOS token; a policy turn could not end")
        closed = self.render([{"role": "user", "content": "u"}, {"role": "assistant", "content": _MARK}])
        after = closed[closed.rindex(_MARK) + len(_MARK):]
        if not after.startswith(eos):
            raise ConfigError(f"{where}: the chat template ends an assistant turn with {after[:20]!r}, not the EOS "
                              f"token {eos!r}: a sampled turn (which stops at EOS) would not match the template")
        self.after_eos = after[len(eos):]  # what the template writes after a turn's EOS (ChatML: "\n")

    def render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        kwargs = {"tools": self.tools} if self.tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt(self, messages: list[Message]) -> list[int]:
        """The first messages with the generation prompt, tokenized as every prompt is (``encode_prompts``)."""
        return encode_prompts(self.tokenizer, [self.render(messages, generation_prompt=True)])[0]

    def answer(self, history: list[Message], new: list[Message]) -> list[int]:
        """The tokens appended after a policy turn that stopped at EOS: the template's text after the
        EOS, the ``new`` messages and the generation prompt (``history`` ends with that turn, as text)."""
        before = self.render(history)
        after = self.render([*history, *new], generation_prompt=True)
        if not after.startswith(before):
            roles = ", ".join(sorted({m["role"] for m in new}))
            at, was, now = first_difference(self.tokenizer, self.encode(before), self.encode(after))
            raise ConfigError(f"{self.where}: the chat template is not append-only for {roles} messages: adding "
                              f"them re-renders the earlier turns (token {at}: {was!r} became {now!r}); the trained "
                              "tokens would not be the sampled ones. Use a template that renders every turn the same "
                              "whatever follows it")
        return self.encode(self.after_eos + after[len(before):])

    def turn(self, content: str) -> list[int]:
        """A policy turn's tokens as a sampler that wrote ``content`` would emit them (probes, tests)."""
        return [*self.encode(content), self.tokenizer.eos_token_id]


def check_append_only(tokenizer: Any, tools: list[dict[str, Any]] | None, roles: tuple[str, ...],
                      where: str = "policy") -> None:
    """Raise ``ConfigError`` unless a probe conversation built turn by turn (``ChatTokens``) gives
    the tokens of its whole rendering: a user turn, then for each role in ``roles`` a policy turn
    and a message of that role, then a last policy turn. The error names the template's source
    (``where``), the message kinds and the first token that differs."""
    chat = ChatTokens(tokenizer, tools, where)
    history: list[Message] = [{"role": "user", "content": "What is 12 + 30?"}]
    ids = chat.prompt(history)
    for n, role in enumerate((*roles, None)):
        content = f"step {n}: 42"
        ids += chat.turn(content)
        history.append({"role": "assistant", "content": content})
        if role is not None:
            new = [{"role": role, "content": f"result {n}: 42"}]
            ids += chat.answer(history, new)
            history += new
    whole = encode_prompts(tokenizer, [chat.render(history)])[0]
    whole = whole[:len(whole) - len(chat.encode(chat.after_eos))] if chat.after_eos else whole
    if ids != whole:
        at, built, rendered = first_difference(tokenizer, ids, whole)
        raise ConfigError(
            f"{where}: the chat template is not append-only for {', '.join(roles) or 'assistant'} messages: the "
            f"conversation built turn by turn differs from its whole rendering at token {at} ({built!r} built, "
            f"{rendered!r} rendered whole); the trained tokens would not be the sampled ones. Use a template that "
            "renders every turn the same whatever follows it")


def first_difference(tokenizer: Any, a: list[int], b: list[int]) -> tuple[int, str, str]:
    """(index, token of ``a``, token of ``b``) at the first position where two id lists differ."""
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    name = [(tokenizer.convert_ids_to_tokens(ids[at:at + 1]) or ["(end)"])[0] for ids in (a, b)]
    return at, name[0], name[1]
