"""WebEnv: read web pages (urllib + html.parser, no extra dependencies) and search the web.

Synchronous: the server runs these in a worker thread. Without network they fail with a 500 whose
detail says why, as any failing tool does.
"""

import re
from html.parser import HTMLParser

from . import config
from .errors import NodeError

_MAX_PAGE = 5 << 20
_SKIP = {"script", "style", "noscript", "template", "svg"}
_BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
          "header", "footer", "title", "pre", "table", "ul", "ol", "dt", "dd", "blockquote"}


class _Text(HTMLParser):
    def __init__(self, base: str):
        super().__init__(convert_charrefs=True)
        self.base = base
        self.parts, self.links = [], []
        self._skip = 0
        self._title = False
        self.title = ""
        self._href = None
        self._anchor = []

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self._skip += 1
        if tag == "title":
            self._title = True
        if tag in _BLOCK:
            self.parts.append("\n")
        if tag == "a":
            self._href = dict(attrs).get("href")
            self._anchor = []

    def handle_endtag(self, tag):
        if tag in _SKIP and self._skip:
            self._skip -= 1
        if tag == "title":
            self._title = False
        if tag in _BLOCK:
            self.parts.append("\n")
        if tag == "a" and self._href:
            from urllib.parse import urljoin

            text = " ".join("".join(self._anchor).split())
            href = urljoin(self.base, self._href)
            if text and href.startswith("http"):
                self.links.append((text, href))
            self._href = None

    def handle_data(self, data):
        if self._title:
            self.title += data
            return
        if self._skip:
            return
        self.parts.append(data)
        if self._href is not None:
            self._anchor.append(data)


def _fetch(url: str):
    import urllib.error
    import urllib.request

    if not isinstance(url, str) or not re.match(r"https?://", url, re.I):
        raise NodeError(500, f"URL {url!r} is not a http or https url, please give a valid url!")
    req = urllib.request.Request(url, headers={"User-Agent": config.USER_AGENT,
                                               "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    try:
        with urllib.request.urlopen(req, timeout=config.WEB_TIMEOUT) as resp:
            raw = resp.read(_MAX_PAGE)
            charset = resp.headers.get_content_charset() or "utf-8"
            ctype = resp.headers.get_content_type()
            final = resp.geturl()
    except urllib.error.HTTPError as exc:
        body = exc.read(2000).decode("utf-8", errors="replace") if exc.fp else ""
        raise NodeError(500, f"HTTP error {exc.code} {exc.reason} for {url}\n{body}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NodeError(500, f"Cannot reach {url}: {reason}") from None
    try:
        text = raw.decode(charset, errors="replace")
    except LookupError:
        text = raw.decode("utf-8", errors="replace")
    return final, ctype, text


def _page_text(url: str, ctype: str, text: str) -> str:
    if "html" not in ctype and not text.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
        return text
    parser = _Text(url)
    parser.feed(text)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    body = "\n".join(line for line in lines if line)
    if parser.title.strip():
        body = " ".join(parser.title.split()) + "\n\n" + body
    if parser.links:
        body += "\n\nLinks:\n" + "".join(f"{t} ({h})\n" for t, h in parser.links)
    return body


def browse_website(url: str, goals_to_browse: str) -> str:
    final, ctype, text = _fetch(url)
    return _page_text(final, ctype, text)


def _search(query: str, region: str):
    from urllib.parse import parse_qs, quote_plus, urlparse

    if config.BING_API_KEY:
        import json
        import urllib.request

        req = urllib.request.Request(
            f"{config.BING_ENDPOINT}?q={quote_plus(query)}&mkt={quote_plus(region)}",
            headers={"Ocp-Apim-Subscription-Key": config.BING_API_KEY})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                pages = json.load(resp)["webPages"]["value"]
        except Exception as exc:
            raise NodeError(500, f"Bing search failed: {exc}") from None
        return [{"name": p.get("name", ""), "snippet": p.get("snippet", ""), "url": p.get("url", "")}
                for p in pages]
    _, _, html = _fetch(f"https://html.duckduckgo.com/html/?q={quote_plus(query)}&kl={quote_plus(region.lower())}")
    results = []
    for m in re.finditer(r'<a[^>]+class="result__a"[^>]+href="([^"]+)"[^>]*>(.*?)</a>(.*?)'
                         r'(?:class="result__snippet"[^>]*>(.*?)</a>|$)', html, re.S):
        href = m.group(1).replace("&amp;", "&")
        target = parse_qs(urlparse(href).query).get("uddg", [href])[0]
        if target.startswith("//"):
            target = "https:" + target
        strip = lambda s: " ".join(re.sub(r"<[^>]+>", "", s or "").split())  # noqa: E731
        results.append({"name": strip(m.group(2)), "snippet": strip(m.group(4)), "url": target})
    return results


def search_and_browse(search_query: str, goals_to_browse: str, region: str = None, num_results: int = 3):
    pages = _search(search_query, region or "en-US")
    out = []
    for page in pages[: max(0, num_results)]:
        try:
            content = browse_website(page["url"], goals_to_browse)
        except NodeError as exc:
            content = str(exc.detail)
        out.append({"name": page["name"], "snippet": page["snippet"], "page": content})
    return out
