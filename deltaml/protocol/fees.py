"""What a party's wallet pays per gas at most, whatever the ledger advises (no imports: the command
line reads the defaults before anything heavy is loaded)."""

from __future__ import annotations

from decimal import Decimal

GWEI = 10**9
#: The most a wallet signs for per gas unless its party says otherwise (``--max-fee-gwei``): the
#: fee cap of an EIP-1559 transaction (it pays the base fee and its tip, at most this), or a legacy
#: price. The ledger advises prices (the chain's), and a wallet follows them only up to this, so a
#: ledger cannot spend a party's ether on fees (given to a block producer it works with): at the
#: ceiling, a ``confirm`` costs at most 0.025 ETH and a ``createJob`` 0.1 ETH.
MAX_FEE = 500 * GWEI
#: The most of that for the block's producer (``--max-tip-gwei``); the ledger raises a tip passed
#: over up to this and no further (``deltaml.agents.ledger.node.MAX_TIP``).
MAX_TIP = 64 * GWEI


def gwei(wei: int) -> str:
    """An amount of wei in gwei, exactly ("0.000000001", "20", "1.5")."""
    text = f"{Decimal(wei) / GWEI:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
