"""twistd plugins: `twistd apptunnel` (proxy), `twistd apptunnel-agent` (agent) and
`twistd apptunnel-bot` (bot).

This file is imported by Twisted's plugin scanner, so it only names where the real
service makers live; importing them happens when twistd picks one.
"""

from twisted.application.service import ServiceMaker

apptunnel_proxy = ServiceMaker(
    "apptunnel proxy",
    "apptunnel.proxy.tap",
    "Identity-aware access proxy: web UI, app subdomains and the agents' tunnel listener.",
    "apptunnel",
)

apptunnel_agent = ServiceMaker(
    "apptunnel agent",
    "apptunnel.agent.tap",
    "Agent beside internal apps: dials out to the proxy and relays its streams.",
    "apptunnel-agent",
)

apptunnel_bot = ServiceMaker(
    "apptunnel bot",
    "apptunnel.bot.tap",
    "Bot (machine identity): joins once, renews a short-lived certificate, serves outputs.",
    "apptunnel-bot",
)
