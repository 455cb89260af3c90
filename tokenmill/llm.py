"""Offline batch API: ``LLM(model).generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.outputs import RequestOutput, merge_outputs
from tokenmill.sampling import SamplingParams

Prompt = str | Sequence[int]
Message = dict[str, Any]


class LLM:
    """Run many prompts through one engine with continuous batching.

    ``LLM()`` loads the bundled SmolLM2-135M-Instruct; ``LLM(model=path, **engine_args)``
    takes any :class:`~tokenmill.engine.args.EngineArgs` field (dtype, max_model_len,
    kv_cache_memory, max_num_seqs, ...).
    """

    def __init__(self, model: str | None = None, **engine_args: Any):
        self.engine = LLMEngine.from_engine_args(model=model, **engine_args)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; outputs come back in input order.

        A prompt is a string or a list of token ids. ``sampling_params`` is one
        object for all prompts or one per prompt. A progress bar is shown for
        more than 8 prompts unless ``use_tqdm=False``.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts"
                )
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(
                    rid, prompt, params, priority=priority[i] if priority else 0
                )
                ids.append(rid)
            return self._run(ids, use_tqdm if use_tqdm is not None else len(ids) > 8)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list, then generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        if messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        prompts = [
            self.tokenizer.encode(
                self.tokenizer.apply_chat_template(
                    list(conv), add_generation_prompt=add_generation_prompt
                ),
                add_special_tokens=False,
            )
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], show_progress: bool) -> list[RequestOutput]:
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req", dynamic_ncols=True)
        try:
            while pending:
                outputs = self.engine.step()
                if not outputs and not self.engine.has_unfinished_requests():
                    break
                for delta in outputs:
                    if delta.request_id not in pending:
                        continue
                    whole = merge_outputs(results.get(delta.request_id), delta)
                    results[delta.request_id] = whole
                    if whole.finished:
                        pending.discard(delta.request_id)
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]
