"""The embedded broker: kombu's filesystem transport, with messages written atomically.

kombu's filesystem transport creates a message file under its final name and then writes
it; a consumer listing the folder in between reads an empty or partial file, fails to
decode it and the Celery worker stops ("Unrecoverable error: JSONDecodeError"). Here a
message is written to a hidden temporary name (which no queue's pattern matches), flushed
to disk and renamed into place, so a consumer only ever sees complete messages and a
message survives a power cut once ``send_task`` has returned.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

ALIAS = "carebridge-filesystem"


class Channel(filesystem.Channel):
    """A filesystem channel whose messages appear in the queue folder complete."""

    # kombu's own two base classes disagree on this signature; this is filesystem.Channel's.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        temporary = os.path.join(self.data_folder_out, f".{name}.tmp")
        try:
            with open(temporary, "wb", buffering=0) as stream:
                stream.write(str_to_bytes(dumps(payload)))
                os.fsync(stream.fileno())
            os.replace(temporary, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise ChannelError(f"cannot add a message to {self.data_folder_out!r}") from exc


class Transport(filesystem.Transport):
    """kombu's filesystem transport with :class:`Channel`."""

    Channel = Channel


TRANSPORT_ALIASES[ALIAS] = f"{__name__}:Transport"
