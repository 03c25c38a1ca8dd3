"""The JSON API over aiohttp."""
