"""The API's routers: jobs, the catalog (models, attention, datasets) and health."""
