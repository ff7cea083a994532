"""The served model: raw audio of whole songs in, genres out, and the guard in front."""
