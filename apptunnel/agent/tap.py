"""`twistd apptunnel-agent`: options and the service maker for the agent."""

from twisted.python import usage

from apptunnel.config import ConfigError, load_agent_config


class Options(usage.Options):
    synopsis = "--config PATH"
    optParameters = [
        ["config", "c", None, "Path of the agent's YAML configuration file."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required (e.g. --config etc/agent.yaml)")


def makeService(options: Options):
    """Load the config and saved identity; any problem is one line from twistd."""
    from twisted.internet import reactor

    from apptunnel.agent.join import JoinError
    from apptunnel.agent.service import AgentService

    try:
        config = load_agent_config(options["config"])
        return AgentService(config, reactor)
    except (ConfigError, JoinError) as err:
        raise usage.UsageError(str(err)) from None
