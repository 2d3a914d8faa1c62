"""`twistd apptunnel-bot`: options and the service maker for a bot."""

from twisted.python import usage

from apptunnel.bot.config import load_bot_config
from apptunnel.config import ConfigError
from apptunnel.errors import ApptunnelError, os_error_text
from apptunnel.startup import startup_error

PROG = "apptunnel-bot"


class Options(usage.Options):
    synopsis = "--config PATH"
    optParameters = [
        ["config", "c", None, "Path of the bot's YAML configuration file."],
    ]

    def postOptions(self) -> None:
        """Load the config here, so a bad one is one line before anything starts."""
        if not self["config"]:
            startup_error(PROG, "--config is required (e.g. --config etc/bot.yaml)")
        try:
            self.bot_config = load_bot_config(self["config"])
        except ConfigError as err:
            startup_error(PROG, str(err))


def makeService(options: Options):
    from twisted.internet import reactor

    from apptunnel.bot.service import BotService

    try:
        return BotService(options.bot_config, reactor)
    except OSError as err:
        startup_error(PROG, os_error_text(err))
    except ApptunnelError as err:
        startup_error(PROG, str(err))
