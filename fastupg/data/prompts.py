"""Prompt templates: the paper's system prompt and the tokenizer's chat template.

The HPT code (github.com/TsinghuaC3I/Unify-Post-Training) trains on LUFFY's data
(Hugging Face ``Elliott/Openr1-Math-46k-8192``, written to ``openr1.parquet`` by LUFFY's
``data/prepare_train.py``), whose ``prompt`` column already holds chat messages
``[{"role": "system", ...}, {"role": "user", "content": <problem>}]``. The system turn is the
prompt below; its text is the SYSTEM_PROMPT of LUFFY's data-preparation scripts
(github.com/ElliottYan/LUFFY, ``data/``), also quoted by later papers that follow LUFFY's setup
for Qwen2.5-Math-1.5B/7B. The model input is that conversation rendered with the tokenizer's
own chat template and a generation prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LUFFY_SYSTEM_PROMPT", "QWEN_MATH_SYSTEM_PROMPT", "PromptConfig", "build_messages", "render_prompt"]

LUFFY_SYSTEM_PROMPT = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final "
    "solution. This involves analyzing, summarizing, exploring, reassessing, and refining your "
    "thought process through multiple iterations. Structure your response into two sections: "
    "Thought and Solution. In the Thought section, present your reasoning using the format: "
    "\"<think>\n {thoughts} </think>\n\". Each thought should include detailed analysis, "
    "brainstorming, verification, and refinement of ideas. After \"</think>\n,\" in the Solution "
    "section, provide the final, logical, and accurate answer, clearly derived from the exploration "
    "in the Thought section. If applicable, include the answer in \\boxed{} for closed-form results "
    "like multiple choices or mathematical solutions."
)

# Qwen2.5-Math's own recommended CoT system prompt (its model card), for a baseline evaluation.
QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptConfig:
    """How a question becomes the model input.

    system_prompt: the system turn; None or "" for none.
    use_data_system_prompt: when the data's prompt column is a chat with its own system turn
        (LUFFY's parquet), keep that one instead of `system_prompt`.
    question_suffix: appended to the question (e.g. an answer-format instruction).
    chat_template: "auto" (the tokenizer's chat template; plain text when it has none),
        "chat" (require one), or "plain" ("{system}\n\n{question}\n" without any template).
    """
    system_prompt: str | None = LUFFY_SYSTEM_PROMPT
    use_data_system_prompt: bool = False
    question_suffix: str = ""
    chat_template: str = "auto"

    def __post_init__(self):
        if self.chat_template not in ("auto", "chat", "plain"):
            raise ValueError(f"PromptConfig.chat_template must be 'auto', 'chat' or 'plain', got {self.chat_template!r}")


def build_messages(question: str, cfg: PromptConfig = PromptConfig(), data_system: str | None = None) -> list[dict]:
    """The chat turns for one question: optional system turn, then the user turn."""
    if not isinstance(question, str):
        raise TypeError(f"question must be str, got {type(question).__name__}")
    system = data_system if (cfg.use_data_system_prompt and data_system) else cfg.system_prompt
    msgs = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": question + cfg.question_suffix})
    return msgs


def render_prompt(question: str, tokenizer, cfg: PromptConfig = PromptConfig(), data_system: str | None = None) -> str:
    """The model input text (special tokens included: encode it with add_special_tokens=False)."""
    msgs = build_messages(question, cfg, data_system)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if cfg.chat_template == "chat" and not has_template:
        raise ValueError("PromptConfig.chat_template='chat' but the tokenizer has no chat template")
    if cfg.chat_template == "plain" or not has_template:
        body = "\n\n".join(m["content"] for m in msgs) + "\n"
        bos = getattr(tokenizer, "bos_token", None) or ""
        return bos + body
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
