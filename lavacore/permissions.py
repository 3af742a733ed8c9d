"""Who may do what: LAVA's model, decided here and nowhere else.

- **Users** are active or not, staff or not, superusers or not; anonymous callers read
  what is public. A superuser may do everything; an inactive user nothing.
- **Model-wide permissions** (LAVA's Django permissions, ``app.codename`` such as
  ``lava_scheduler_app.change_device``) given to a user or to one of its groups apply to
  every object of that model.
- **Per-object permissions** are given to groups, on a device type (``view_devicetype``,
  ``submit_to_devicetype``, ``change_devicetype``) or a device (``view_device``,
  ``submit_to_device``, ``change_device``). Each includes the weaker ones (change, then
  submit, then view). An object with a permission given to some group is *restricted* for
  that permission: nobody else has it. A device type nobody restricted is seen by everyone
  and takes jobs from every user; a device follows its type unless restricted itself.
- **Jobs**: the submitter and superusers see a job; a job with ``visibility: {group:
  [...]}`` is seen by the members of every one of those groups; a public job by whoever
  sees its device (or, before it has one, its device type); a personal job by nobody else.
  The submitter, the members of its groups (a group-visible job), or whoever may change
  its device (type) may cancel it; resubmitting also needs only the right to submit to
  it.

Everything else an administrator changes (workers, users, groups, tags, aliases, health
checks...) needs a superuser or the model-wide permission named where it is checked.
"""

import dataclasses

from .states import DeviceHealth

VIEW, SUBMIT, CHANGE = "view", "submit", "change"
ACTIONS = (CHANGE, SUBMIT, VIEW)  # strongest first: each includes those after it
MODELS = {"devicetype": "devicetype", "device": "device"}
APP = "lava_scheduler_app"


def codename(kind, action):
    """view_devicetype, submit_to_device, ... (LAVA's codenames)."""
    return "%s_%s%s" % (action, "to_" if action == SUBMIT else "", kind)


OBJECT_CODENAMES = {codename(kind, action): (kind, action)
                    for kind in MODELS for action in ACTIONS}
# The model-wide permissions a user or group may be given (auth.users.perms.add), by
# model: LAVA's Django permissions of the objects lavacore has.
MODEL_PERMISSIONS = {
    ("auth", "user"): ("add_user", "change_user", "delete_user", "view_user"),
    ("auth", "group"): ("add_group", "change_group", "delete_group", "view_group"),
    (APP, "device"): ("add_device", "change_device", "delete_device", "view_device",
                      "submit_to_device"),
    (APP, "devicetype"): ("add_devicetype", "change_devicetype", "delete_devicetype",
                          "view_devicetype", "submit_to_devicetype"),
    (APP, "worker"): ("add_worker", "change_worker", "delete_worker", "view_worker"),
    (APP, "testjob"): ("add_testjob", "change_testjob", "delete_testjob", "view_testjob",
                       "cancel_resubmit_testjob"),
    (APP, "tag"): ("add_tag", "change_tag", "delete_tag", "view_tag"),
    (APP, "alias"): ("add_alias", "change_alias", "delete_alias", "view_alias"),
}


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who calls: ``username`` None for an anonymous caller."""

    username: str = None
    is_active: bool = True
    is_staff: bool = False
    is_superuser: bool = False
    groups: frozenset = frozenset()
    perms: frozenset = frozenset()   # model-wide, "app.codename"

    @property
    def authenticated(self):
        return self.username is not None

    @classmethod
    def load(cls, storage, username):
        """The principal of ``username``: its user record (a token's owner without one is
        a plain active user), groups and model-wide permissions."""
        from .storage import NotFound

        if username is None:
            return ANONYMOUS
        try:
            user = storage.get_user(username)
        except NotFound:
            active, staff, superuser = True, False, False
        else:
            active, staff, superuser = user.is_active, user.is_staff, user.is_superuser
        groups = frozenset(storage.user_groups(username))
        perms = frozenset(storage.model_permissions(username, groups))
        return cls(username, active, staff, superuser, groups, perms)


ANONYMOUS = Principal()
# The master itself and the command line on its host (which has the database anyway).
SYSTEM = Principal("lava-health", is_superuser=True, is_staff=True)


class Policy:
    """The decisions for one principal, over one snapshot of the per-object permissions
    (a small table, read once per request)."""

    def __init__(self, storage, principal):
        self.storage = storage
        self.principal = principal
        self._objects = None   # (kind, name) -> {codename: {groups}}

    def _all_objects(self):
        if self._objects is None:
            table = {}
            for row_kind, row_name, group, code in self.storage.object_permissions():
                table.setdefault((row_kind, row_name), {}).setdefault(code, set()).add(group)
            self._objects = table
        return self._objects

    def _object_perms(self, kind, name):
        return self._all_objects().get((kind, name), {})

    # -- the primitives -----------------------------------------------------------------

    def has_model_perm(self, app, code):
        p = self.principal
        if not p.authenticated or not p.is_active:
            return False
        return p.is_superuser or "%s.%s" % (app, code) in p.perms

    def restricted(self, kind, name, action):
        """Whether some group was given ``action`` (exactly) on this object."""
        return bool(self._object_perms(kind, name).get(codename(kind, action)))

    def has_perm(self, kind, name, action):
        """The principal holds ``action`` (or a stronger one) on this object, model-wide
        or through one of its groups."""
        p = self.principal
        if not p.authenticated or not p.is_active:
            return False
        if p.is_superuser:
            return True
        stronger = ACTIONS[:ACTIONS.index(action) + 1]
        if any("%s.%s" % (APP, codename(kind, a)) in p.perms for a in stronger):
            return True
        perms = self._object_perms(kind, name)
        return any(p.groups & perms.get(codename(kind, a), set()) for a in stronger)

    # -- device types and devices ----------------------------------------------------------

    def can_view_type(self, name):
        return self.has_perm("devicetype", name, VIEW) or not self.restricted(
            "devicetype", name, VIEW)

    def can_submit_type(self, name):
        if not self.principal.authenticated or not self.principal.is_active:
            return False
        return self.has_perm("devicetype", name, SUBMIT) or (
            not self.restricted("devicetype", name, SUBMIT) and self.can_view_type(name))

    def can_change_type(self, name):
        return self.has_perm("devicetype", name, CHANGE)

    def can_view_device(self, device):
        if self.has_perm("device", device.hostname, VIEW):
            return True
        return not self.restricted("device", device.hostname, VIEW) and \
            self.can_view_type(device.device_type)

    def can_submit_device(self, device):
        p = self.principal
        if device.health == DeviceHealth.RETIRED:
            return False
        if p.username == "lava-health":
            return True
        if not p.authenticated or not p.is_active:
            return False
        if self.has_perm("device", device.hostname, SUBMIT):
            return True
        return not self.restricted("device", device.hostname, SUBMIT) and \
            self.can_submit_type(device.device_type) and self.can_view_device(device)

    def can_change_device(self, device):
        if self.has_perm("device", device.hostname, CHANGE):
            return True
        return not self.restricted("device", device.hostname, CHANGE) and \
            self.can_change_type(device.device_type)

    def hidden_types(self, names):
        return {name for name in names if not self.can_view_type(name)}

    # -- jobs -----------------------------------------------------------------------------

    def can_view_job(self, job):
        p = self.principal
        if p.is_superuser and p.is_active:
            return True
        if p.authenticated and p.is_active and job.submitter == p.username:
            return True
        if job.visibility == "group":
            groups = set(job.viewing_groups)
            return bool(groups) and p.is_active and groups <= p.groups
        if job.visibility != "public":
            return False
        if job.actual_device:
            if self.has_perm("device", job.actual_device, VIEW):
                return True
            if self.restricted("device", job.actual_device, VIEW):
                return False
        if job.requested_device_type:
            return self.can_view_type(job.requested_device_type)
        return True

    def can_change_job(self, job):
        p = self.principal
        if not p.authenticated or not p.is_active:
            return False
        if job.submitter == p.username or p.is_superuser:
            return True
        if job.visibility == "group" and job.viewing_groups and \
                set(job.viewing_groups) <= p.groups:
            return True  # a group-visible job is its group's to cancel and resubmit
        if job.actual_device:
            if self.has_perm("device", job.actual_device, CHANGE):
                return True
            if self.restricted("device", job.actual_device, CHANGE):
                return False
        return bool(job.requested_device_type) and self.can_change_type(
            job.requested_device_type)

    def can_cancel_job(self, job):
        return self.can_change_job(job) or self.has_model_perm(APP, "change_testjob")

    def can_resubmit_job(self, job):
        if self.can_cancel_job(job):
            return True
        return bool(job.requested_device_type) and self.can_submit_type(
            job.requested_device_type)

    def job_filter(self):
        """A JobFilter (SQL) keeping the jobs this principal may see; None: all."""
        p = self.principal
        if p.is_superuser and p.is_active:
            return None
        hidden_types, hidden_devices = set(), set()
        for (kind, name), perms in self._all_objects().items():
            if kind == "devicetype" and not self.can_view_type(name):
                hidden_types.add(name)
            elif kind == "device" and perms.get(codename("device", VIEW)) and \
                    not self.has_perm("device", name, VIEW):
                hidden_devices.add(name)
        return JobFilter(p.username if p.is_active else None,
                         sorted(p.groups) if p.is_active else [], sorted(hidden_types),
                         sorted(hidden_devices))


@dataclasses.dataclass(frozen=True)
class JobFilter:
    """The jobs a user may see, as an SQL condition on ``jobs`` (see Policy.can_view_job:
    the same rules)."""

    username: str
    groups: list
    hidden_types: list
    hidden_devices: list

    def sql(self):
        params = []
        clauses = []
        if self.username is not None:
            clauses.append("submitter = ?")
            params.append(self.username)
        public = ["visibility = 'public'"]
        if self.hidden_types:
            public.append("(requested_device_type IS NULL OR requested_device_type NOT IN"
                          " (%s))" % ", ".join("?" * len(self.hidden_types)))
            params.extend(self.hidden_types)
        if self.hidden_devices:
            public.append("(actual_device IS NULL OR actual_device NOT IN (%s))"
                          % ", ".join("?" * len(self.hidden_devices)))
            params.extend(self.hidden_devices)
        clauses.append("(%s)" % " AND ".join(public))
        # Group jobs: every group of the job is one of the user's.
        outside = "job_groups.group_name NOT IN (%s)" % ", ".join(
            "?" * len(self.groups)) if self.groups else "1 = 1"
        clauses.append("(visibility = 'group' AND EXISTS (SELECT 1 FROM job_groups WHERE"
                       " job_groups.job_id = jobs.id) AND NOT EXISTS (SELECT 1 FROM"
                       " job_groups WHERE job_groups.job_id = jobs.id AND %s))" % outside)
        params.extend(self.groups)
        return "(%s)" % " OR ".join(clauses), params


def policy(storage, username):
    return Policy(storage, Principal.load(storage, username))


# What a job event keeps for a subscriber who may not see the job: enough to follow it
# (lavacli's ``jobs wait``), nothing about who submitted it or what it is.
REDACTED_JOB_KEYS = ("job", "state", "health", "sub_id", "pipeline")
PRIVATE = "(private)"  # the user frame of such an event


def event_for(policy, kind, data, username):
    """(data, username) of an event as ``policy``'s principal may receive it, or None when
    it may not receive it at all. ``policy`` None: nothing private may be shown (who may
    see what cannot be read now)."""
    from .models import Device, Job

    if not isinstance(data, dict):
        return None
    if kind == "testjob":
        try:
            job = Job(id=data.get("job"), submitter=data.get("submitter") or "",
                      visibility=data.get("visibility") or "public",
                      requested_device_type=data.get("device_type"),
                      actual_device=data.get("device"),
                      viewing_groups=tuple(data.get("viewing_groups") or ()))
        except (AttributeError, TypeError):
            return None
        if policy is not None and policy.can_view_job(job):
            return data, username
        redacted = {key: data[key] for key in REDACTED_JOB_KEYS if key in data}
        redacted["description"] = ""  # lavacli reads it from every job event
        return redacted, PRIVATE
    if kind == "device" and data.get("device") and data.get("device_type"):
        device = Device(str(data["device"]), str(data["device_type"]))
        if policy is None or not policy.can_view_device(device):
            return None
    return data, username
