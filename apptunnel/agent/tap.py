"""`twistd apptunnel-agent`: options and the service maker for the agent."""

from twisted.python import usage

from apptunnel.config import ConfigError, load_agent_config
from apptunnel.errors import ApptunnelError, os_error_text
from apptunnel.startup import startup_error

PROG = "apptunnel-agent"


class Options(usage.Options):
    synopsis = "--config PATH"
    optParameters = [
        ["config", "c", None, "Path of the agent's YAML configuration file."],
    ]

    def postOptions(self) -> None:
        """Load the config here, so a bad one is one line before anything starts.

        Not a UsageError: twistd would print its whole ``Options:`` block above it.
        """
        if not self["config"]:
            startup_error(PROG, "--config is required (e.g. --config etc/agent.yaml)")
        try:
            self.agent_config = load_agent_config(self["config"])
        except ConfigError as err:
            startup_error(PROG, str(err))


def makeService(options: Options):
    """Build the agent from its config and saved identity; problems are one line."""
    from twisted.internet import reactor

    from apptunnel.agent.service import AgentService

    try:
        return AgentService(options.agent_config, reactor)
    except OSError as err:
        startup_error(PROG, os_error_text(err))
    except ApptunnelError as err:
        startup_error(PROG, str(err))
