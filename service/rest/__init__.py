"""HTTP only: routers, request reading, error handlers. Domain logic lives in service.dataplane."""
