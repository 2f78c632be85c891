-- Replies per message (inbound SMS that the provider tied to it).

with

inbound as (

    select * from {{ ref('int_inbound_classified') }}
    where in_reply_to_message_id is not null

),

final as (

    select
        in_reply_to_message_id as message_id,
        count(*) as replies,
        max(case when keyword = 'stop' then 1 else 0 end) = 1 as replied_stop,
        cast(sum(case when is_complaint then 1 else 0 end) as bigint) as complaints,
        min(received_at) as first_replied_at
    from inbound
    group by 1

)

select * from final
