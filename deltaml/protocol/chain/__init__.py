"""The escrow contract seen from pure code: call encoding, signing, proofs, the payment formula.

Theory of operation: parties never talk to a chain. A party's :class:`Wallet`
turns a contract call into a signed transaction (eth-account, deterministic
signatures) and wraps it in a ``TxRequest`` for the ledger agent, the only
chain client. Before its first transaction a wallet greets the ledger
(``ChainHello``) and learns the chain id, the contract address and its nonce
(``ChainInfo``); calls made before that wait in order. Every receipt carries
the sender's next nonce and the prices to sign at (an EIP-1559 fee cap and
tip, or a legacy price on a chain without a base fee), so a wallet never
drifts from the chain; one that says "sign again" (the chain will not mine
the transaction at its price) has the wallet sign the same call at the same
nonce and those prices.

The contract's job key is ``keccak256(job_id)``; model index 0 is the model
trained by everyone and ``i + 1`` the model without the ``i``-th trainer.
:func:`mse_micro` and :func:`expected_settlement` are the contract's
integer arithmetic, so anyone can predict a settlement to the wei.

The package: :mod:`.contract` (the contract's interface: names, gas, calldata, transactions),
:mod:`.metrics` (metrics on chain and the payment formula), :mod:`.party` (wallets and the
parties around them). Everything is importable from here.
"""

from __future__ import annotations

from ..fees import GWEI, MAX_FEE, MAX_TIP
from ..settlement import DEFAULT_DEADLINE
from .contract import (ABANDONED, CONTRACT, GAS_LIMITS, GAS_PER_PARTICIPANT, JOB_STATES, LEDGER,
                       METRICS_PER_TX, RawTx, artifact, decode_call, encode_call, error_text, event_audience, gas_limit,
                       int_bytes, job_key, key_hash, parse_tx, signature)
from .metrics import (KEPT_BITS, check_metric_proof, check_metric_proofs, expected_settlement, metric_args,
                      model_index, mse_micro)
from .party import ChainParty, Collector, Wallet, event_for, same_address

__all__ = ["ABANDONED", "CONTRACT", "DEFAULT_DEADLINE", "GAS_LIMITS", "GAS_PER_PARTICIPANT", "GWEI", "JOB_STATES",
           "KEPT_BITS", "LEDGER", "MAX_FEE", "MAX_TIP", "METRICS_PER_TX", "ChainParty", "Collector", "RawTx", "Wallet",
           "artifact", "check_metric_proof", "check_metric_proofs", "decode_call", "encode_call", "error_text",
           "event_audience", "event_for", "expected_settlement", "gas_limit", "int_bytes", "job_key", "key_hash",
           "metric_args", "model_index", "mse_micro", "parse_tx", "same_address", "signature"]
