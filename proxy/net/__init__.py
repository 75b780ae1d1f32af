"""Trio shells around the core: the clients' WebSocket server, the fan-out hub, the upstream
link and the HTTP side. They own sockets and tasks; decisions are the core's."""
