"""A daemon's state on disk (SQLite), so a killed agent resumes where it stopped.

After every step that changed its core, the ack policy writes, in one
transaction, the core's snapshot, who signed for whom (the keyring) and the
answers to the message just handled — before it publishes them and before the
broker hears the ack. A crash anywhere in that order is safe: a message not yet
in the checkpoint is redelivered and handled again from the state before it
(the core's randomness is part of the state, so it gives the same answers); a
message already in it is redelivered and answered again from the stored
answers. The directory and the database are the agent's own (modes 0700 and
0600): they hold the state of its jobs.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
from pathlib import Path

from ..protocol import messages as m

KEEP_ANSWERS = 10_000


class CheckpointError(RuntimeError):
    """A state directory whose database cannot be used."""


class Checkpoint:
    """``state.sqlite`` in an agent's state directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / "state.sqlite"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except FileExistsError:  # mkdir's word for a file (or a link to one) where the directory should be
            raise CheckpointError(f"{self.directory}: not a directory; give --state-dir a directory "
                                  f"(created if missing)") from None
        except (OSError, sqlite3.Error) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CheckpointError(f"{path}: cannot be opened as a state database ({why})") from None
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 1), "
                            "core BLOB, keys BLOB)")
            self.db.execute("CREATE TABLE IF NOT EXISTS answers (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                            "message_id TEXT UNIQUE, envelopes TEXT)")
        except sqlite3.DatabaseError as exc:  # a file that is not ours: left as it is, for its owner to look at
            self.db.close()
            raise CheckpointError(f"{path}: not a state database ({exc}); move it aside to start afresh") from None

    def save(self, core: bytes, keys: dict, handled: str | None, answers: list[m.Envelope]) -> None:
        """The state after one step, and that step's answers (under the handled message's
        ``job/sender/message_id``, :func:`deltaml.agents.policy.handled_key`), atomically."""
        with_answers = handled is not None
        self.db.execute("BEGIN")
        try:
            self.db.execute("INSERT OR REPLACE INTO state (id, core, keys) VALUES (1, ?, ?)",
                            (core, pickle.dumps(keys)))
            if with_answers:
                encoded = "\n".join(m.encode(a).decode() for a in answers)
                self.db.execute("INSERT OR REPLACE INTO answers (message_id, envelopes) VALUES (?, ?)",
                                (handled, encoded))
                self.db.execute("DELETE FROM answers WHERE seq <= (SELECT MAX(seq) FROM answers) - ?",
                                (KEEP_ANSWERS,))
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:  # SQLite has rolled a failed write (a full disk) back itself
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise CheckpointError(f"{self.directory / 'state.sqlite'}: cannot write the state ({exc})") from None
            raise

    def core(self) -> bytes | None:
        """The last saved snapshot of the core alone (not the answers: a ledger reads which escrow it
        belongs to before its agent loads the rest), or None for a fresh agent."""
        row = self.db.execute("SELECT core FROM state WHERE id = 1").fetchone()
        return None if row is None else row[0]

    def load(self) -> tuple[bytes, dict, dict[str, list[m.Envelope]]] | None:
        """The last saved state, keyring and answers, or None for a fresh agent."""
        row = self.db.execute("SELECT core, keys FROM state WHERE id = 1").fetchone()
        if row is None:
            return None
        answers = {}
        for handled, encoded in self.db.execute("SELECT message_id, envelopes FROM answers ORDER BY seq"):
            answers[handled] = [m.decode(line) for line in encoded.splitlines() if line]
        return row[0], pickle.loads(row[1]), answers

    def close(self) -> None:
        self.db.close()
