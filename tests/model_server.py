"""A scripted stand-in for a model API, on 127.0.0.1, for driving the real agent CLIs.

Claude Code speaks the Anthropic Messages API (POST /v1/messages, streamed as
server-sent events), Codex the OpenAI Responses API (POST /v1/responses, also
streamed). The server plays a script: every answer to the agent's main loop is
the next step, either one tool call or the end of the turn with a line of text.
The script runs on across sessions, so an agent restarted by the supervisor picks
up where it stands. For every call the server records what the client sent back
(the tool result), so a test can tell a call that ran from one that was refused.
When the script runs out, every answer ends the turn. A step may also be a
function of the server returning the step to play (it can look at the outputs so
far, and put steps back in front). Agents that run side by side (night.py --gpus)
each play a script of their own, added for their working directory.

Side requests (Claude Code's title and summary queries carry no tools) are
answered with a short text and do not advance the script.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Call:
    """One scripted tool call; `output` is None until the client answers it."""
    name: str
    input: dict
    id: str = ""
    output: str | None = None
    is_error: bool | None = None
    session: int = 0
    on_play: object = None  # called (without arguments) when the call is handed out

    def __repr__(self):
        return f"{self.name}({json.dumps(self.input)[:120]}) -> {str(self.output)[:300]!r}"


@dataclass
class End:
    """The model ends its turn (the agent CLI then exits)."""
    text: str = "Done for now."
    session: int = 0
    on_play: object = None


@dataclass
class ModelServer:
    api: str  # "anthropic" (Claude Code) or "openai" (Codex)
    steps: list = field(default_factory=list)
    played: list = field(default_factory=list)  # steps handed out, in order
    prompts: list = field(default_factory=list)  # first user text of each session
    requests: list = field(default_factory=list)  # every request body, for debugging
    scripts: dict = field(default_factory=dict)  # working directory -> the steps of the agent working there

    def __post_init__(self):
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # model lists and health checks
                self.reply_json({"data": [], "models": []})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = json.loads(body or b"{}")
                if self.path.split("?")[0].endswith("/count_tokens"):
                    return self.reply_json({"input_tokens": 1000})
                with server.lock:
                    server.requests.append({"path": self.path, "body": req})
                    step = server.answer(req)
                events = (server.anthropic_events if server.api == "anthropic"
                          else server.openai_events)(req, step)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for name, data in events:
                    self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()
                self.close_connection = True

            def reply_json(self, obj):
                out = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, *steps, cwd=None):
        """The next steps; with cwd, of the agent working there only (Claude Code's system prompt
        names its working directory)."""
        with self.lock:
            (self.steps if cwd is None else self.scripts.setdefault(str(cwd), [])).extend(steps)

    @property
    def calls(self):
        return [s for s in self.played if isinstance(s, Call)]

    # --- the script

    def answer(self, req):
        """Record the tool results in req; return the next step (None: a side request)."""
        if self.api == "anthropic":
            if not req.get("tools"):
                return None
            messages = req.get("messages", [])
            results = [(b["tool_use_id"], _text(b.get("content")), bool(b.get("is_error")))
                       for m in messages if m["role"] == "user" and isinstance(m["content"], list)
                       for b in m["content"] if b.get("type") == "tool_result"]
            first = not any(m["role"] == "assistant" for m in messages)
            prompt = _text(messages[0]["content"]) if messages else ""
            cwd = re.search(r"Primary working directory: (.+)", _text(req.get("system")))
            steps = self.scripts.get(cwd[1].strip() if cwd else None, self.steps)
        else:
            items = req.get("input", [])
            if not req.get("tools"):
                return None
            results = [(i["call_id"], _text(i.get("output")), None)
                       for i in items if i.get("type") in ("function_call_output", "custom_tool_call_output")]
            first = not any(i.get("type") in ("function_call", "custom_tool_call") or i.get("role") == "assistant"
                            for i in items)
            prompt = _text([i for i in items if i.get("role") == "user"][-1]["content"]) if items else ""
            steps = self.steps
        for call in self.calls:
            for call_id, output, is_error in results:
                if call.id == call_id and call.output is None:
                    call.output, call.is_error = output, is_error
        if first:
            self.prompts.append(prompt)
        step = steps.pop(0) if steps else End("The script is finished.")
        while callable(step):  # a step decided from what came back (e.g. poll until a command exits)
            step = step(self)
        step.session = len(self.prompts)
        if isinstance(step, Call):
            step.id = f"call_{next(self.ids)}"
        self.played.append(step)
        if step.on_play:
            step.on_play()
        return step

    def anthropic_events(self, req, step):
        msg_id = f"msg_{next(self.ids)}"
        yield "message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": req.get("model", "m"),
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1}}}
        if isinstance(step, Call):
            block = {"type": "tool_use", "id": step.id, "name": step.name, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(step.input)}
            stop = "tool_use"
        else:
            block = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": step.text if step else "ok"}
            stop = "end_turn"
        yield "content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}
        yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}
        yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                "usage": {"output_tokens": 1}}
        yield "message_stop", {"type": "message_stop"}

    def openai_events(self, req, step):
        resp_id = f"resp_{next(self.ids)}"
        if isinstance(step, Call):
            if step.name == "apply_patch" and isinstance(step.input, str):  # a freeform tool
                item = {"type": "custom_tool_call", "id": f"ctc_{step.id}", "call_id": step.id,
                        "name": step.name, "input": step.input, "status": "completed"}
            else:
                item = {"type": "function_call", "id": f"fc_{step.id}", "call_id": step.id,
                        "name": step.name, "arguments": json.dumps(step.input), "status": "completed"}
        else:
            text = step.text if step else "ok"
            item = {"type": "message", "id": f"msg_{resp_id}", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}
        yield "response.created", {"type": "response.created", "response": {"id": resp_id}}
        yield "response.output_item.added", {"type": "response.output_item.added", "output_index": 0, "item": item}
        yield "response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": item}
        yield "response.completed", {"type": "response.completed", "response": {
            "id": resp_id, "output": [item],
            "usage": {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 2}}}


def _text(content):
    """The text of a message or tool result: a string, or a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text(b.get("text", b.get("content", ""))) if isinstance(b, dict) else str(b)
                         for b in content)
    return "" if content is None else json.dumps(content)
