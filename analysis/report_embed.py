"""plotly.js and the interactive figures packed into the report page, gzip-compressed.

Inlined as is, plotly.js (about 4.8 MB) and the figures' JSON (the same keys and styling again and again)
make most of the page; gzip shrinks them about 3 and 25 times. The page carries both as base64 text in
inert ``<script type='application/octet-stream'>`` elements and a small loader unpacks them with the
browser's standard ``DecompressionStream('gzip')`` (Chrome 80, Firefox 113, Safari 16.4), runs plotly.js,
then draws each figure from its own line of JSON: the page stays one file that opens offline from disk,
and a figure that fails to draw fails alone. Only then does the page check that every figure drew.

gzip's header is written with mtime 0, so the same report gives the same bytes.
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json

import plotly.graph_objects as go
import plotly.io as pio

PLOTLY_JS_ID = "plotly-js-gz"
FIGURES_ID = "plotly-figures-gz"
PLOT_CONFIG = {"responsive": True, "displaylogo": False}

# A figure drew when its image decoded, or when plotly put an SVG with content into its div. The check runs
# once the page has loaded and every figure has been drawn (or has failed to); `why` says what stopped the
# interactive figures as a whole, if anything did.
_CHECK_JS = """
function checkFigures(why) {
  var figs = Array.prototype.slice.call(document.querySelectorAll('.figure'));
  var drew = function (f) {
    if (f.dataset.figure === 'image') {
      var i = f.querySelector('img');
      return !!(i && i.complete && i.naturalWidth > 0);
    }
    var svg = f.querySelector('.js-plotly-plot svg.main-svg');
    return !!(svg && svg.getBoundingClientRect().width > 0 && svg.querySelectorAll('path, text').length > 0);
  };
  var bad = figs.filter(function (f) { return !drew(f); });
  document.body.setAttribute('data-figures-ok', String(figs.length - bad.length));
  document.body.setAttribute('data-figures-broken', String(bad.length));
  if (bad.length) {
    var b = document.getElementById('broken-figures');
    b.textContent = bad.length + ' figure(s) failed to draw: ' + bad.map(function (f) { return f.title; }).join(', ') +
      (why ? ' (' + why + ')' : '');
    b.style.display = 'block';
  }
}
"""

_LOADER_JS = """
(function () {
  function unpack(id) {
    var text = atob(document.getElementById(id).textContent.trim()), bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    var plain = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
    return new Response(plain).text();
  }
  function runScript(code) {
    var s = document.createElement('script');
    s.textContent = code;
    document.head.appendChild(s);
  }
  function drawOne(line, k, config) {  // line k holds the figure of the box with id figure-k
    var failed = function (e) { console.error('report figure-' + k + ' failed to draw: ' + e); };
    try {
      var f = JSON.parse(line);
      return Promise.resolve(Plotly.newPlot(f.id, {data: f.data, layout: f.layout, frames: f.frames,
                                                   config: config})).catch(failed);
    } catch (e) {
      failed(e);
    }
  }
  var why = '';
  var drawn = Promise.resolve();
  if (document.getElementById('%(figures)s')) {
    if (typeof DecompressionStream === 'undefined') {
      why = 'this browser lacks DecompressionStream (Chrome 80+, Firefox 113+, Safari 16.4+ have it)';
      console.error('report: ' + why);
    } else {
      window.PLOTLYENV = window.PLOTLYENV || {};
      drawn = Promise.all([unpack('%(plotly)s'), unpack('%(figures)s')]).then(function (texts) {
        runScript(texts[0]);
        return Promise.all(texts[1].split('\\n').map(function (line, k) { return drawOne(line, k, %(config)s); }));
      }).catch(function (e) {
        why = 'the packed plotly.js or figures could not be unpacked: ' + e;
        console.error('report: ' + why);
      });
    }
  }
  var loaded = new Promise(function (done) { window.addEventListener('load', done); });
  Promise.all([loaded, drawn]).then(function () { checkFigures(why); });
})();
"""


def pack(text: str) -> str:
    """``text`` gzip-compressed (level 9, mtime 0: the same text gives the same bytes), base64-encoded."""
    return base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


def unpack(packed: str) -> str:
    return gzip.decompress(base64.b64decode(packed)).decode("utf-8")


@functools.cache
def packed_plotly_js() -> str:
    """plotly.js of the installed plotly, packed (about a second of work: done once per process)."""
    from plotly.offline import get_plotlyjs

    return pack(get_plotlyjs())


def _css_size(value: object) -> str:
    """A layout width or height as plotly's own HTML export sizes the figure's box: pixels, else 100 %."""
    if value is None:
        return "100%"
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return f"{value}px"


def figure_div(fig: go.Figure, div_id: str) -> tuple[str, str]:
    """The figure's empty box for the page, and its one line of JSON for the packed figures."""
    spec = pio.to_json(fig, validate=True, pretty=False)  # plotly's own encoder: numpy arrays, dates, NaN
    layout = json.loads(spec).get("layout", {})
    template = (layout.get("template") or {}).get("layout", {})
    height, width = (html.escape(_css_size(layout.get(k, template.get(k)))) for k in ("height", "width"))
    box = (f"<div style='height:{height}; width:{width};'>"
           f"<div id='{div_id}' class='plotly-graph-div' style='height:100%; width:100%;'></div></div>")
    assert spec.startswith("{") and "\n" not in spec, "plotly's JSON is one object on one line"
    return box, f'{{"id":{json.dumps(div_id)},{spec[1:]}'


def page_scripts(figure_lines: list[str]) -> str:
    """The end of the page: packed plotly.js and figures (when there are figures), the loader and the check."""
    blobs = ""
    if figure_lines:
        blobs = (f"<script type='application/octet-stream' id='{PLOTLY_JS_ID}'>{packed_plotly_js()}</script>\n"
                 f"<script type='application/octet-stream' id='{FIGURES_ID}'>{pack(chr(10).join(figure_lines))}"
                 "</script>\n")
    loader = _LOADER_JS % {"plotly": PLOTLY_JS_ID, "figures": FIGURES_ID, "config": json.dumps(PLOT_CONFIG)}
    return f"{blobs}<script>{_CHECK_JS}{loader}</script>"
