"""The models a worker serves and how it runs them: the registry (every checkpoint under
one folder), reload, the request schema every API and form validates against, admission
(the scheduler), the engine loop that decodes every running request together, and the
service in front of them. No routes here; it imports only app.platform.
"""
