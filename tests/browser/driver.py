"""A real browser for tests/connect_pages.rs: headless Chromium (Debian's
chromium + chromium-driver) driven by Selenium over WebDriver.

Reads one JSON command per line on stdin, answers one JSON line on stdout:
{"ok": true, "value": ...} or {"ok": false, "error": "..."}. The test (Rust)
decides what to click and checks what it sees; this only moves the browser.

Commands: goto {url}; fill {css, value}; click {css}; wait {css | url_contains,
secs}; url; source; text {css}; exists {css}; script {js} (test-only DOM
edits, e.g. removing the CSRF field); screenshot {path, width, height};
resize {width, height};
visited (every URL the browser requested, redirects included); logs (the
browser console); quit.
"""

import json
import os
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def start():
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1024,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # No Selenium Manager download: the driver is Debian's.
    service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    d = webdriver.Chrome(service=service, options=opts)
    d.set_page_load_timeout(30)
    return d


def main():
    d = start()
    visited = []
    console = []

    def drain_logs():
        for e in d.get_log("performance"):
            try:
                m = json.loads(e["message"])["message"]
            except (KeyError, ValueError):
                continue
            if m.get("method") == "Network.requestWillBeSent":
                visited.append(m["params"]["request"]["url"])
        console.extend(e["message"] for e in d.get_log("browser"))

    print(json.dumps({"ok": True, "value": "ready"}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            value = None
            if op == "goto":
                d.get(cmd["url"])
            elif op == "fill":
                el = d.find_element(By.CSS_SELECTOR, cmd["css"])
                el.clear()
                el.send_keys(cmd["value"])
            elif op == "click":
                d.find_element(By.CSS_SELECTOR, cmd["css"]).click()
            elif op == "wait":
                secs = cmd.get("secs", 20)
                if "css" in cmd:
                    WebDriverWait(d, secs).until(lambda b: b.find_elements(By.CSS_SELECTOR, cmd["css"]))
                else:
                    WebDriverWait(d, secs).until(lambda b: cmd["url_contains"] in b.current_url)
            elif op == "url":
                value = d.current_url
            elif op == "source":
                value = d.page_source
            elif op == "text":
                value = d.find_element(By.CSS_SELECTOR, cmd["css"]).text
            elif op == "exists":
                value = len(d.find_elements(By.CSS_SELECTOR, cmd["css"])) > 0
            elif op == "script":
                value = d.execute_script(cmd["js"])
            elif op == "screenshot":
                d.set_window_size(cmd.get("width", 1024), cmd.get("height", 900))
                d.save_screenshot(cmd["path"])
            elif op == "resize":
                d.set_window_size(cmd["width"], cmd["height"])
            elif op == "visited":
                drain_logs()
                value = visited
            elif op == "logs":
                drain_logs()
                value = console
            elif op == "quit":
                print(json.dumps({"ok": True}), flush=True)
                break
            else:
                raise ValueError(f"unknown op {op!r}")
            print(json.dumps({"ok": True, "value": value}), flush=True)
        except Exception as e:  # the test shows it with the command
            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
    d.quit()


if __name__ == "__main__":
    main()
