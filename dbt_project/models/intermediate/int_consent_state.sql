-- Current consent per number and purpose, derived from the append-only ledger.
-- Rules: the latest event wins; on a tie an opt-out wins (the safe side); an opt-out by
-- keyword reply (STOP) covers every purpose, so it is applied to each of them.

with

consent_events as (

    select * from {{ ref('stg_ops__consent_events') }}

),

purposes as (

    -- every purpose, even one the ledger has no event for yet: a STOP must still cover it
    select 'marketing' as purpose
    union all
    select 'service' as purpose

),

ledger as (

    select
        phone_e164,
        purpose,
        action,
        consent_source,
        occurred_at,
        consent_event_id
    from consent_events

    union all

    -- a STOP reply opts the number out of every purpose, not only the one it was recorded for
    select
        consent_events.phone_e164,
        purposes.purpose,
        consent_events.action,
        consent_events.consent_source,
        consent_events.occurred_at,
        consent_events.consent_event_id
    from consent_events
    cross join purposes
    where consent_events.action = 'opt_out'
        and consent_events.consent_source = 'keyword_reply'
        and purposes.purpose <> consent_events.purpose

),

ranked as (

    select
        *,
        row_number() over (
            partition by phone_e164, purpose
            order by
                occurred_at desc,
                case when action = 'opt_out' then 0 else 1 end,
                consent_event_id desc
        ) as recency_rank
    from ledger

),

milestones as (

    select
        phone_e164,
        purpose,
        max(case when action = 'opt_in' then occurred_at end) as last_opt_in_at,
        max(case when action = 'opt_out' then occurred_at end) as last_opt_out_at,
        count(*) as consent_events
    from ledger
    group by 1, 2

),

final as (

    select
        ranked.phone_e164,
        ranked.purpose,
        ranked.action = 'opt_in' as is_opted_in,
        ranked.action = 'opt_out' as is_opted_out,
        ranked.action as last_action,
        ranked.consent_source as last_source,
        ranked.occurred_at as last_changed_at,
        milestones.last_opt_in_at,
        milestones.last_opt_out_at,
        milestones.consent_events
    from ranked
    inner join milestones
        on ranked.phone_e164 = milestones.phone_e164
        and ranked.purpose = milestones.purpose
    where ranked.recency_rank = 1

)

select * from final
