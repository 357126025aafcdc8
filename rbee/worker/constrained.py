"""Sampling under a grammar without paying for it on every token.

llama.cpp's grammar sampler checks every candidate token against the grammar: put first in a
chain, it runs over the whole vocabulary each step (on the default model, 49k tokens: 12 ms a
token, which took one JSON stream from 110 to 46 tokens/s on the 2-core CPU, and in a batch
every other stream waits for it). llama-server's sampler does what this one does: draw with the
ordinary chain, ask the grammar about that one token, and only when the grammar refuses it,
filter the whole vocabulary and draw again. The result has the constrained distribution (an
allowed token t is drawn with p(t) at once or, after a refusal, with p(t)/A on the redraw,
A the allowed mass: p(t)/A in all) and, greedy, the grammar-first chain's very token.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from rbee.errors import InvalidRequest


class Constrained:
    """One sequence's ordinary sampler chain plus its grammar; owns both (``free``)."""

    def __init__(self, llama_cpp: Any, ctx: Any, n_vocab: int, chain: Any, grammar: Any) -> None:
        self.lc = llama_cpp
        self.ctx = ctx
        self.n_vocab = n_vocab
        self.chain = chain
        self.grammar = grammar
        data = llama_cpp.llama_token_data
        self._one = (data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(self._one, 1, -1, False)
        self._all: Any = None  # the whole vocabulary, allocated on the first refusal
        self._all_data: Any = None
        self._all_array: Any = None
        self._view: Any = None

    def sample(self, row: int) -> int:
        """The next token from batch row ``row``'s logits, allowed by the grammar."""
        lc = self.lc
        token = int(lc.llama_sampler_sample(self.chain, self.ctx, row))
        logits = lc.llama_get_logits_ith(self.ctx, row)
        one = self._one[0]
        one.id, one.logit, one.p = token, logits[token], 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        lc.llama_sampler_apply(self.grammar, ctypes.byref(self._one_array))
        if one.logit == float("-inf"):
            token = self._redraw(logits)
        lc.llama_sampler_accept(self.grammar, token)
        return token

    def _redraw(self, logits: Any) -> int:
        """The grammar over every token, then the chain over what it left."""
        lc = self.lc
        if self._all is None:
            self._all = (lc.llama_token_data * self.n_vocab)()
            self._all_data = ctypes.cast(self._all, ctypes.POINTER(lc.llama_token_data))
            self._all_array = lc.llama_token_data_array(self._all_data, self.n_vocab, -1, False)
            self._view = np.ctypeslib.as_array(self._all)
        view = self._view
        view["id"] = np.arange(self.n_vocab, dtype=np.int32)  # a sampler may have sorted them
        view["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        view["p"] = 0.0
        array = self._all_array
        array.data, array.size, array.selected = self._all_data, self.n_vocab, -1
        array.sorted = False
        lc.llama_sampler_apply(self.grammar, ctypes.byref(array))
        if np.isneginf(view["logit"]).all():  # llama.cpp aborts on accepting a refused token
            raise InvalidRequest("the grammar allows no token of this model's vocabulary here")
        lc.llama_sampler_apply(self.chain, ctypes.byref(array))
        return int(self._all[array.selected].id)

    def free(self) -> None:
        """Free both samplers."""
        self.lc.llama_sampler_free(self.chain)
        self.lc.llama_sampler_free(self.grammar)
