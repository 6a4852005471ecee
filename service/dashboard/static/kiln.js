// Auto-refresh for pages whose <main> has data-refresh-ms (an active job, the overview).
// The page is fetched again and <main> replaced in place, so the scroll position stays and a
// build log that was scrolled to its end follows new lines. Refreshing stops when the new page
// no longer asks for it (the job finished). Without JavaScript a <noscript> meta refresh runs.
// Action forms with data-confirm ask first.
document.addEventListener("submit", function (event) {
  var form = event.target;
  if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
  }
});

(function () {
  "use strict";
  var main = document.getElementById("main");
  if (!main || !main.dataset.refreshMs) return;
  var every = Number(main.dataset.refreshMs);

  function logAtEnd() {
    var log = main.querySelector("pre.log");
    return !log || log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  }

  function followLog(wasAtEnd, keepTop) {
    var log = main.querySelector("pre.log");
    if (log) log.scrollTop = wasAtEnd ? log.scrollHeight : keepTop;
  }

  function refresh() {
    if (document.hidden) return setTimeout(refresh, every);
    fetch(location.href, { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) throw new Error(response.status);
        return response.text();
      })
      .then(function (html) {
        var page = new DOMParser().parseFromString(html, "text/html");
        var fresh = page.getElementById("main");
        if (!fresh) return;
        var atEnd = logAtEnd();
        var log = main.querySelector("pre.log");
        var top = log ? log.scrollTop : 0;
        main.innerHTML = fresh.innerHTML;
        document.title = page.title;
        followLog(atEnd, top);
        if (fresh.dataset.refreshMs) setTimeout(refresh, every);
      })
      .catch(function () { setTimeout(refresh, every * 2); });  // server busy or restarting
  }

  followLog(true, 0);
  setTimeout(refresh, every);
})();
