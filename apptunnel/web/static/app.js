// apptunnel web UI: small progressive enhancements. Every page works without this file.
(function () {
  "use strict";

  // Copy buttons: the text to copy is in data-copy.
  document.querySelectorAll("[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var text = button.getAttribute("data-copy");
      var done = function () { button.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, function () {});
      }
    });
  });

  // Live catalogue search: hide cards that do not match while typing, and keep the URL
  // (?q=...) in step so the view stays shareable. Submitting the form does the same on
  // the server.
  var form = document.querySelector("[data-live-filter]");
  var cards = document.querySelectorAll("[data-cards] > li");
  if (form && cards.length) {
    var input = form.querySelector("input[name=q]");
    input.addEventListener("input", function () {
      var needle = input.value.trim().toLowerCase();
      cards.forEach(function (card) {
        var text = card.textContent.toLowerCase();
        card.hidden = needle !== "" && text.indexOf(needle) < 0;
      });
      var url = new URL(window.location.href);
      if (needle) { url.searchParams.set("q", input.value.trim()); }
      else { url.searchParams.delete("q"); }
      window.history.replaceState(null, "", url.pathname + url.search);
    });
  }
})();
