"""A blocking client of the agent, for the command line."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from cryptfs.errors import CryptfsError, NotAVolume, UsageError, WrongPassphrase
from cryptfs.keyagent import protocol as p
from cryptfs.secret import Secret

DEFAULT_SOCKET = "/run/cryptfs/agent.sock"


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("CRYPTFS_AGENT_SOCKET") or DEFAULT_SOCKET


class AgentError(CryptfsError):
    """The agent is unreachable, or refused the request."""

    exit_code = 8

    def __init__(self, message: str, code: str = p.INTERNAL, hint: str | None = None,
                 reply: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint)
        self.code = code
        self.reply = reply or {}


class AgentClient:
    def __init__(self, path: str | None = None, timeout: float = 60.0) -> None:
        self.path = socket_path(path)
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        deadline = time.monotonic() + self.timeout
        pause = 0.01
        try:
            while True:
                try:
                    s.connect(self.path)
                    return s
                except BlockingIOError:
                    # A Unix socket's listen queue is full: the agent is busy.
                    # (A socket with a timeout does not wait for room by itself.)
                    if time.monotonic() + pause > deadline:
                        raise AgentError("the key agent is overloaded (its connection queue "
                                         "stayed full)") from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.2)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            raise AgentError(f"no key agent is running at {self.path}",
                             hint="start it: systemctl start cryptfs-agent.socket "
                                  "(or run cryptfs-agent)") from None
        except PermissionError:
            s.close()
            raise AgentError(f"permission denied connecting to {self.path}") from None
        except TimeoutError:
            s.close()
            raise AgentError(f"the key agent at {self.path} did not accept in time") from None
        except OSError as e:
            s.close()
            raise AgentError(f"cannot connect to the key agent at {self.path}: "
                             f"{e.strerror or e}") from None
        except BaseException:
            s.close()
            raise

    @staticmethod
    def _recv_exact(s: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise AgentError("the key agent closed the connection")
            buf += chunk
        return bytes(buf)

    def request(self, msg: dict[str, Any], secret: Secret | None = None) -> dict[str, Any]:
        """Send one request and return the reply; raises AgentError if it is not ok."""
        if secret is not None and len(secret) > p.MAX_SECRET:
            raise UsageError(f"the passphrase is longer than {p.MAX_SECRET} bytes")
        s = self._connect()
        try:
            data = p.encode({**msg, "secret": True} if secret is not None else msg)
            if secret is not None:
                data += p.frame(p.FRAME_SECRET, secret.reveal())
            try:
                s.sendall(data)
                n = p.frame_length(self._recv_exact(s, p.LEN_BYTES))
                body = self._recv_exact(s, n)
                answer = p.decode(body[0], body[1:])
            except TimeoutError:
                raise AgentError("the key agent did not answer in time") from None
            except p.ProtocolError as e:
                raise AgentError(f"bad reply from the key agent: {e}") from None
            except OSError as e:
                raise AgentError(f"lost the connection to the key agent: {e.strerror or e}") from None
        finally:
            s.close()
        if not answer.get("ok"):
            code = str(answer.get("code"))
            text = str(answer.get("message") or code)
            if code == p.WRONG_PASSPHRASE:
                err: CryptfsError = WrongPassphrase(text + _retry_hint(answer))
                raise err
            if code == p.NOT_A_VOLUME:  # (the exit code a command run without the agent gives)
                raise NotAVolume(text)
            raise AgentError(text, code=code, reply=answer)
        return answer


def _retry_hint(answer: dict[str, Any]) -> str:
    wait = answer.get("retry_after")
    if isinstance(wait, (int, float)) and wait >= 1:
        return f" (next attempt allowed in {wait:.0f} s)"
    return ""
