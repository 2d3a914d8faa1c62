"""`twistd apptunnel-agent`: options and the service maker for the agent."""

from twisted.python import usage

from apptunnel.config import ConfigError, load_agent_config


class Options(usage.Options):
    synopsis = "--config PATH"
    optParameters = [
        ["config", "c", None, "Path of the agent's YAML configuration file."],
    ]

    def postOptions(self) -> None:
        """Load the config here: twistd prints a UsageError as one line, without a traceback."""
        if not self["config"]:
            raise usage.UsageError("--config is required (e.g. --config etc/agent.yaml)")
        try:
            self.agent_config = load_agent_config(self["config"])
        except ConfigError as err:
            raise usage.UsageError(str(err)) from None


def makeService(options: Options):
    """Build the agent from its config and saved identity; problems are one line."""
    from twisted.internet import reactor

    from apptunnel.agent.join import JoinError
    from apptunnel.agent.service import AgentService

    try:
        return AgentService(options.agent_config, reactor)
    except (ConfigError, JoinError, OSError) as err:
        raise SystemExit(f"apptunnel-agent: error: {err}") from None
