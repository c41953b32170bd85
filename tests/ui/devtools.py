"""Drives a headless Chromium over the DevTools protocol for tests/tests/ui.rs.

    devtools.py BROWSER_WS PAGE_URL LOADED_SELECTOR SCREENSHOT

Opens PAGE_URL in a new tab, prints `loaded` once LOADED_SELECTOR matches, then reads
EDGE_SELECTOR (a `g.edge` element) from stdin (the test makes more traffic first, which
the page must pick up on its own), waits until it matches, clicks the edge's label with real mouse
events, waits for the detail panel's decisions, saves a PNG screenshot to SCREENSHOT,
and prints one JSON line: every edge's data attributes, the detail panel's text and every
URL the page requested.
Fails (exit status 1, the reason on stderr) when something does not show up in time.
"""

import base64
import json
import sys
import time

import websocket

TIMEOUT = 30.0


class Tab:
    """One page target, attached in flat mode over the browser's WebSocket."""

    def __init__(self, browser_ws):
        self.ws = websocket.create_connection(browser_ws, timeout=TIMEOUT)
        self.last_id = 0
        self.session = None
        # Every URL the page asked for (Network.requestWillBeSent events).
        self.requests = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method, **params):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("method") == "Network.requestWillBeSent":
                self.requests.append(reply["params"]["request"]["url"])
            # Other events, and answers to nothing we wait for, are skipped.
            if reply.get("id") != self.last_id:
                continue
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, selector, what, timeout=TIMEOUT):
        query = f"document.querySelector({json.dumps(selector)}) !== null"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(query):
                return
            time.sleep(0.1)
        edges = self.evaluate(EDGES)
        raise RuntimeError(f"no {what} ({selector}) within {timeout} s; edges: {edges}")

    def click(self, selector):
        """Presses and releases the mouse on the centre of the element."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )


EDGES = "[...document.querySelectorAll('g.edge')].map(g => ({ ...g.dataset }))"


def main():
    browser_ws, page_url, loaded, screenshot = sys.argv[1:5]
    tab = Tab(browser_ws)
    tab.call("Emulation.setDeviceMetricsOverride", width=1280, height=800,
             deviceScaleFactor=1, mobile=False)
    tab.call("Network.enable")
    tab.call("Page.navigate", url=page_url)
    tab.wait_for(loaded, "graph")
    print("loaded", flush=True)
    edge = sys.stdin.readline().strip()
    tab.wait_for(edge, "edge")
    # The page redraws every 2 s: a press and a release that straddle a redraw land on
    # two elements, which is no click; the next try lands on one.
    for _ in range(5):
        tab.click(f"{edge} text")
        try:
            tab.wait_for("#decisions", "detail panel", timeout=1.0)
            break
        except RuntimeError:
            continue
    tab.wait_for("#decisions", "detail panel")
    detail = tab.evaluate("document.getElementById('detail').innerText")
    png = tab.call("Page.captureScreenshot", format="png")["data"]
    with open(screenshot, "wb") as out:
        out.write(base64.b64decode(png))
    result = {"edges": tab.evaluate(EDGES), "detail": detail, "requests": tab.requests}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # the test shows stderr; a traceback adds nothing
        print(f"devtools.py: {error}", file=sys.stderr)
        sys.exit(1)
