// The job page: show or hide log levels, and follow the log while the job runs by
// asking for the lines after the last one shown (/jobs/ID/log?start=N). Everything a
// line holds goes into the page as text (textContent), never as HTML.
(function () {
  "use strict";
  var log = document.getElementById("log");
  if (!log) {
    return;
  }
  var boxes = document.querySelectorAll("input[data-level]");
  Array.prototype.forEach.call(boxes, function (box) {
    box.addEventListener("change", function () {
      log.classList.toggle("hide-" + box.getAttribute("data-level"), !box.checked);
    });
  });
  if (log.getAttribute("data-follow") !== "1") {
    return;
  }
  var url = log.getAttribute("data-log-url");
  var next = parseInt(log.getAttribute("data-next"), 10) || 0;
  var status = document.getElementById("follow-status");
  var total = document.getElementById("log-total");
  var from = document.getElementById("log-from");
  var to = document.getElementById("log-to");
  var state = document.getElementById("job-state");
  var KEEP = 5000;          // lines kept on the page; older ones are dropped
  var EVERY = 1000;         // ms between two polls
  var dropped = false;

  function span(cls, text) {
    var node = document.createElement("span");
    node.className = cls;
    node.textContent = text;
    return node;
  }

  function line(item) {
    var row = document.createElement("div");
    row.className = "line lvl-" + item.lvl;
    row.id = "L" + (item.n + 1);
    var link = document.createElement("a");
    link.className = "n";
    link.href = "#L" + (item.n + 1);
    link.textContent = String(item.n + 1);
    row.appendChild(link);
    row.appendChild(span("dt", item.dt.length > 18 ? item.dt.slice(11, 19) : item.dt));
    row.appendChild(span("lv", item.lvl));
    row.appendChild(span("msg", item.msg));
    return row;
  }

  function trim() {
    var rows = log.querySelectorAll(".line");
    var extra = rows.length - KEEP;
    for (var i = 0; i < extra; i++) {
      log.removeChild(rows[i]);
    }
    if (extra > 0 && !dropped) {
      dropped = true;
      var gap = document.createElement("div");
      gap.className = "gap";
      gap.textContent = "(earlier lines are on the log's other pages)";
      log.insertBefore(gap, log.firstChild);
    }
  }

  function finish(data) {
    var badge = document.createElement("span");
    badge.className = "badge health-" + String(data.health).toLowerCase();
    badge.textContent = data.health;
    if (state) {
      state.textContent = "";
      state.appendChild(badge);
    }
    status.textContent = "The job finished (" + data.health + "). ";
    var again = document.createElement("a");
    again.href = window.location.pathname;
    again.textContent = "Reload for its results.";
    status.appendChild(again);
  }

  function poll() {
    fetch(url + "?start=" + next, {credentials: "same-origin", cache: "no-store",
                                   headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        var bottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
        var part = document.createDocumentFragment();
        data.lines.forEach(function (item) {
          part.appendChild(line(item));
        });
        log.appendChild(part);
        next = data.next;
        if (total) {
          total.textContent = String(data.total);
        }
        if (to && data.lines.length) {
          to.textContent = String(next);
          if (from && from.textContent === "0") {
            from.textContent = String(data.lines[0].n + 1);
          }
        }
        trim();
        if (bottom && data.lines.length) {
          window.scrollTo(0, document.body.scrollHeight);
        }
        if (data.finished) {
          finish(data);
          return;
        }
        if (state && state.textContent.trim() !== data.state) {
          state.textContent = "";
          state.appendChild(span("badge state-" + String(data.state).toLowerCase(), data.state));
        }
        status.textContent = "Following the log while the job runs…";
        window.setTimeout(poll, data.next < data.total ? 0 : EVERY);
      })
      .catch(function (error) {
        status.textContent = "Following paused (" + error.message + "); trying again.";
        window.setTimeout(poll, 5 * EVERY);
      });
  }

  window.setTimeout(poll, EVERY);
}());
